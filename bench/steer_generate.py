"""Steered generation throughput (tokens/s) with an SAE clamp on 3 layers.

Against, at the same batch and token count: unsteered HF ``generate`` with a KV cache, and
TransformerLens ``generate`` (KV cache) with the same clamp as a resid_post hook on a
HookedTransformer of the same shape. Every run generates exactly ``--new-tokens`` tokens per row
(``min_new_tokens``), greedy. Goals: steered / unsteered >= 0.7, steered / TransformerLens >= 3.
"""

from common import hooked_twin, machine, parser, ratio, subject, timed


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k-star", type=int, default=10)
    args = p.parse_args()
    if args.smoke:
        args.batch_size, args.prompt_tokens, args.new_tokens, args.d_sae, args.repeats = 4, 8, 4, 128, 1
    import torch

    from refusal_atlas.steering.clamp import FeatureClamp, FeatureSet
    from refusal_atlas.testing.synthetic import random_saes

    model, tok = subject(args)
    cfg = model.config
    n = cfg.num_hidden_layers
    layers = [n // 4, n // 2, 3 * n // 4]
    saes = random_saes(cfg.hidden_size, args.d_sae, layers, args.device, torch.float32, kind="topk")
    g = torch.Generator().manual_seed(0)
    masks, scale = {}, {}
    for l in layers:
        m = torch.zeros(1, args.d_sae, dtype=torch.bool)
        m[0, torch.randperm(args.d_sae, generator=g)[: args.k_star]] = True
        masks[l], scale[l] = m, torch.ones(1, args.d_sae)
    clamp = FeatureClamp(saes, FeatureSet(masks, scale), mode="multiply", value=-3.0)
    ids = torch.randint(10, cfg.vocab_size, (args.batch_size, args.prompt_tokens), generator=g).to(args.device)
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, temperature=None,
              top_p=None, top_k=None, pad_token_id=tok.pad_token_id)

    def hf_plain():
        with torch.no_grad():
            model.generate(**enc, **kw)

    def hf_steered():
        with torch.no_grad(), clamp.applied(model):
            model.generate(**enc, **kw)

    tl = hooked_twin(cfg, args.prompt_tokens + args.new_tokens + 8, args.device)

    def tl_hook(layer):
        def hook(h, hook):
            return clamp._clamp(layer, h)
        return hook

    hooks = [(f"blocks.{l}.hook_resid_post", tl_hook(l)) for l in layers]

    def tl_steered():
        with torch.no_grad(), tl.hooks(fwd_hooks=hooks):
            tl.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, use_past_kv_cache=True,
                        stop_at_eos=False, verbose=False)

    tokens = args.batch_size * args.new_tokens
    t_plain = timed(hf_plain, args.repeats, args.device)
    t_steer = timed(hf_steered, args.repeats, args.device)
    t_tl = timed(tl_steered, args.repeats, args.device)
    print(f"machine: {machine(args.device)}; batch {args.batch_size}, {args.prompt_tokens} prompt + "
          f"{args.new_tokens} new tokens; clamp on layers {layers} (d_sae {args.d_sae}, K* {args.k_star} each)")
    print(f"HF generate, unsteered: {tokens / t_plain:,.1f} tokens/s")
    print(f"steer_generate (FeatureClamp hooks): {tokens / t_steer:,.1f} tokens/s")
    print(f"TransformerLens generate, same clamp: {tokens / t_tl:,.1f} tokens/s")
    ratio("steered/TransformerLens", t_tl / t_steer, "goal >= 3")
    ratio("steered/unsteered", t_plain / t_steer, "goal >= 0.7")


if __name__ == "__main__":
    main()
