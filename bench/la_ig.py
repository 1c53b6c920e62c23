"""LA-IG time per prompt against one forward plus backward pass of the same batch, and peak memory.

LA-IG (``refusal_atlas.features.attribution.la_ig_batch``) runs a patch pass and a clean pass that record
every SAE layer, then N interpolated forward+backward passes; the reference is one forward pass
and one backward pass (to the input embeddings) of the same model and batch. The goal is
time(LA-IG) / time(forward+backward) <= N + 3. Peak memory: CUDA's allocator peak on a GPU, the
growth of the process's maximum resident set on a CPU.
"""

import resource

from common import machine, parser, prompts, ratio, subject, timed


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--la-bz", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--sae-layers", type=int, default=5)
    args = p.parse_args()
    if args.smoke:
        args.steps, args.d_sae, args.sae_layers, args.repeats = 3, 128, 2, 1
    import torch

    from refusal_atlas.features.attribution import la_ig_batch
    from refusal_atlas.lm.generation import chat_batches
    from refusal_atlas.testing.synthetic import random_saes

    model, tok = subject(args)
    model.requires_grad_(False)
    n = model.config.num_hidden_layers
    layers = sorted({round(i * (n - 1) / max(1, args.sae_layers - 1)) for i in range(args.sae_layers)})
    saes = random_saes(model.config.hidden_size, args.d_sae, layers, args.device, torch.float32, kind="topk")
    _, enc = next(iter(chat_batches(tok, prompts(args.la_bz), args.la_bz, None, args.device)))
    r = torch.randn(model.config.hidden_size, device=args.device)
    emb = model.get_input_embeddings()

    def fwd_bwd():
        x = emb(enc["input_ids"]).detach().requires_grad_(True)
        logits = model(inputs_embeds=x, attention_mask=enc["attention_mask"], use_cache=False).logits
        logits[:, -1].sum().backward()

    def laig():
        la_ig_batch(model, saes, enc, r, refusal_id=1, steps=args.steps)

    t_ref = timed(fwd_bwd, args.repeats, args.device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_laig = timed(laig, args.repeats, args.device)
    if args.device.startswith("cuda"):
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA allocator peak)"
    else:
        peak = f"{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20:.2f} GiB (max RSS growth)"
    print(f"machine: {machine(args.device)}; la_bz {args.la_bz}, {enc['input_ids'].shape[1]} tokens, "
          f"N = {args.steps}, {len(layers)} SAE layers {layers} of width {args.d_sae}")
    print(f"forward+backward: {t_ref:.3f} s/batch; LA-IG: {t_laig:.3f} s/batch = {t_laig / args.la_bz:.3f} s/prompt")
    print(f"LA-IG peak memory: {peak}")
    ratio("LA-IG/(forward+backward)", t_laig / t_ref, f"goal <= N + 3 = {args.steps + 3}")


if __name__ == "__main__":
    main()
