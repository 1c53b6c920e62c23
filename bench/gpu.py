"""GPU hot paths at gemma-2-2b's real compute: a random Gemma-2 with gemma-2-2b's shapes and random
JumpReLU SAEs of Gemma Scope's width (65k), against the device's physical limits.

Measures activation caching (tokens/s), LA-IG at la_bz 5 through 26 SAEs (prompts/s, peak memory)
and steered generation with a clamp on 3 layers (tokens/s), each as a fraction of the device's
peak dense bf16 FLOP/s or memory bandwidth (from the spec sheet of the detected GPU). On a CPU
only ``--smoke`` runs (tiny shapes), so the script cannot rot.
"""

import time

from common import machine, parser, ratio, sync

# dense bf16 tensor-core FLOP/s and HBM bandwidth (bytes/s), vendor spec sheets (SXM parts)
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.04e12)}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    import torch

    from la_ig_memory import measure

    from refusal_atlas.cluster.memory import GEMMA_2_2B, ModelShape
    from refusal_atlas.steering.clamp import FeatureClamp, FeatureSet
    from refusal_atlas.testing.synthetic import random_gemma2, random_saes

    if args.smoke:
        shape, d_sae, n_sae, device = ModelShape(2_000_000, 4, 64, 128, 4, 512), 256, 4, "cpu"
        args.prompt_tokens, args.batch_size, args.new_tokens = 16, 4, 4
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible: run with --smoke on a CPU")
        shape, d_sae, n_sae, device = GEMMA_2_2B, 65_536, 26, "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    flops_peak, bw_peak = next((v for k, v in PEAKS.items() if k in name), (float("nan"), float("nan")))
    model = random_gemma2(shape, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, shape.vocab, (args.batch_size, args.prompt_tokens), device=device)
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    # activation caching: one forward pass per batch, resid_post of every block kept (hooks)
    grabbed = []
    hooks = [b.register_forward_hook(lambda m, i, o: grabbed.append(o[0][:, -1].float().cpu()))
             for b in model.model.layers]
    with torch.no_grad():
        model(**enc, use_cache=False, logits_to_keep=1)
        sync(device)
        start = time.perf_counter()
        for _ in range(3):
            model(**enc, use_cache=False, logits_to_keep=1)
        sync(device)
    for h in hooks:
        h.remove()
    t = (time.perf_counter() - start) / 3
    toks = args.batch_size * args.prompt_tokens
    cache_frac = 2 * params * toks / t / flops_peak
    print(f"machine: {machine(device)}; model {params / 1e9:.2f}B params, {shape.n_layers} layers, d {shape.d_model}")
    print(f"activation caching: {toks / t:,.0f} tokens/s = {cache_frac:.1%} of peak bf16 FLOP/s")

    la = measure(shape, d_sae=d_sae, n_sae_layers=n_sae, la_bz=5, seq_len=args.prompt_tokens, steps=10,
                 device=device)
    print(f"LA-IG (la_bz 5, N = 10, {n_sae} SAEs of {d_sae}): {1 / la['seconds_per_prompt']:.2f} prompts/s, "
          f"peak {la['peak'] / 2**30:.1f} GiB")

    layers = [shape.n_layers // 4, shape.n_layers // 2, 3 * shape.n_layers // 4]
    saes = random_saes(shape.d_model, d_sae, layers, device, dtype)
    masks = {l: torch.zeros(1, d_sae, dtype=torch.bool) for l in layers}
    for m in masks.values():
        m[0, :20] = True
    clamp = FeatureClamp(saes, FeatureSet(masks, {l: torch.ones(1, d_sae) for l in layers}), value=-3.0)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad(), clamp.applied(model):
        model.generate(**enc, **kw)
        sync(device)
        start = time.perf_counter()
        model.generate(**enc, **kw)
        sync(device)
    t = time.perf_counter() - start
    gen = args.batch_size * args.new_tokens
    # each decoding step reads every weight and the 3 SAEs' encoders and decoders once
    step_bytes = (params + 3 * 2 * shape.d_model * d_sae) * (2 if dtype == torch.bfloat16 else 4)
    bw_frac = step_bytes * args.new_tokens / t / bw_peak
    print(f"steered generation (batch {args.batch_size}): {gen / t:,.0f} tokens/s; weight reads at "
          f"{bw_frac:.1%} of peak memory bandwidth")
    ratio("activation caching / peak bf16 FLOP/s", cache_frac, "physical limit 1")


if __name__ == "__main__":
    main()
