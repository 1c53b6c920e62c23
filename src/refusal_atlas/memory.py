"""A memory model of LA-IG (``attribution.la_ig_batch``), to size ``la_bz`` before a cluster run.

The terms follow the implementation: the model and every SAE resident in the model's dtype;
clean and patch latents and errors for every SAE layer; float32 gradient accumulators; per IG
step the interpolated leaves and their gradients; the model's saved activations for one
backward pass from the first SAE layer on. ``python -m refusal_atlas.memory`` prints the
estimate for gemma-2-2b with Gemma Scope 65k SAEs on all 26 layers at ``la_bz`` 5.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GiB = 1024**3


@dataclass
class ModelShape:
    n_params: int
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    vocab: int


# google/gemma-2-2b(-it): 2.61B parameters (config.json of the hub repository).
GEMMA_2_2B = ModelShape(n_params=2_614_341_888, n_layers=26, d_model=2304, d_mlp=9216, n_heads=8, vocab=256_000)


def sae_param_count(d_model: int, d_sae: int) -> int:
    """Parameters of one SAE: W_enc, W_dec, both biases and a threshold (JumpReLU)."""
    return 2 * d_model * d_sae + 2 * d_sae + d_model


def la_ig_memory(
    shape: ModelShape,
    *,
    d_sae: int,
    n_sae_layers: int,
    la_bz: int,
    seq_len: int,
    dtype_bytes: int = 2,
) -> dict[str, float]:
    """Estimated bytes of each term of one LA-IG batch, and the peak (their sum)."""
    bt = la_bz * seq_len
    sae_params = n_sae_layers * sae_param_count(shape.d_model, d_sae)
    latents = n_sae_layers * bt * d_sae
    errors = n_sae_layers * bt * shape.d_model
    # per layer a backward pass keeps roughly: residual and norm inputs, q/k/v/o, MLP gate/up/act,
    # attention probabilities
    saved_per_layer = bt * (8 * shape.d_model + 3 * shape.d_mlp) + la_bz * shape.n_heads * seq_len * seq_len
    terms = {
        "model": shape.n_params * dtype_bytes,
        "saes": sae_params * dtype_bytes,
        "clean_and_patch_latents": 2 * latents * dtype_bytes,
        "clean_and_patch_errors": 2 * errors * dtype_bytes,
        "grad_accumulators_fp32": (latents + errors) * 4,
        "step_leaves_and_grads": 2 * (latents + errors) * dtype_bytes,
        "saved_activations": shape.n_layers * saved_per_layer * dtype_bytes,
        "last_token_logits": 3 * la_bz * shape.vocab * 4,
    }
    terms["peak"] = sum(terms.values())
    return terms


def measure(shape: ModelShape, *, d_sae: int, n_sae_layers: int, la_bz: int, seq_len: int, steps: int,
            device: str, dtype=None) -> dict[str, float]:
    """Run one LA-IG batch on a random Gemma-2 model of ``shape`` with random JumpReLU SAEs of
    Gemma Scope's form; return the peak CUDA memory (bytes, GPU only) and seconds per prompt."""
    import time

    import torch

    from .attribution import la_ig_batch
    from .synthetic import random_gemma2, random_saes

    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = random_gemma2(shape, device, dtype)
    saes = random_saes(shape.d_model, d_sae, range(shape.n_layers - n_sae_layers, shape.n_layers), device, dtype)
    with torch.device(device):
        ids = torch.randint(0, shape.vocab, (la_bz, seq_len))
        mask = torch.ones_like(ids)
        mask[0, : seq_len // 4] = 0  # one left-padded prompt
        enc = {"input_ids": ids, "attention_mask": mask}
        r = torch.randn(shape.d_model)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    la_ig_batch(model, saes, enc, r, refusal_id=1, steps=steps)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else float("nan")
    return {"peak": peak, "seconds_per_prompt": seconds / la_bz}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-sae", type=int, default=65_536)
    p.add_argument("--sae-layers", type=int, default=26)
    p.add_argument("--la-bz", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=128, help="padded prompt length of a batch")
    p.add_argument("--measure", action="store_true", help="also run one LA-IG batch on a random model")
    p.add_argument("--smoke", action="store_true", help="with --measure: tiny shapes, seconds on a CPU")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    shape = GEMMA_2_2B
    if args.smoke:
        shape = ModelShape(n_params=0, n_layers=2, d_model=64, d_mlp=128, n_heads=4, vocab=512)
        args.d_sae, args.sae_layers, args.seq_len, args.steps = 256, 2, 16, 2
    est = la_ig_memory(shape, d_sae=args.d_sae, n_sae_layers=args.sae_layers, la_bz=args.la_bz,
                       seq_len=args.seq_len)
    name = "tiny random Gemma-2" if args.smoke else "gemma-2-2b (bf16)"
    print(f"LA-IG memory model: {name}, {args.sae_layers} SAEs of width {args.d_sae}, "
          f"la_bz {args.la_bz}, {args.seq_len} tokens")
    for key, value in est.items():
        print(f"  {key:26s} {value / GiB:8.2f} GiB")
    print(f"fits one 80 GB GPU: {est['peak'] < 80e9}")
    if args.measure:
        got = measure(shape, d_sae=args.d_sae, n_sae_layers=args.sae_layers, la_bz=args.la_bz,
                      seq_len=args.seq_len, steps=args.steps, device=args.device)
        print(f"measured on {args.device}: {got['seconds_per_prompt']:.3f} s/prompt ({args.steps} IG steps), "
              f"peak {got['peak'] / GiB:.2f} GiB")
        if got["peak"] == got["peak"]:  # not NaN: a GPU run
            print(f"measured/estimated peak: {got['peak'] / est['peak']:.2f}")


if __name__ == "__main__":
    main()

