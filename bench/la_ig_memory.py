"""LA-IG's memory model against a measured peak: python bench/la_ig_memory.py prints the estimate
for gemma-2-2b with Gemma Scope 65k SAEs on all 26 layers at la_bz 5 and, on a GPU, the measured
peak.
"""

from __future__ import annotations

import argparse

import torch
from common import ratio

from refusal_atlas.cluster.memory import GEMMA_2_2B, GiB, ModelShape, la_ig_memory


def measure(shape: ModelShape, *, d_sae: int, n_sae_layers: int, la_bz: int, seq_len: int, steps: int,
            device: str, dtype=None) -> dict[str, float]:
    """Run one LA-IG batch on a random Gemma-2 model of ``shape`` with random JumpReLU SAEs of
    Gemma Scope's form; return the peak CUDA memory (bytes, GPU only) and seconds per prompt."""
    import time

    import torch

    from refusal_atlas.features.attribution import la_ig_batch
    from refusal_atlas.testing.synthetic import random_gemma2, random_saes

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
    p.add_argument("--smoke", action="store_true", help="measure at tiny shapes: seconds on a CPU")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    args.measure = args.measure or args.smoke
    if args.smoke and args.device == "cuda" and not torch.cuda.is_available():
        args.device = "cpu"
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
        # NaN on a CPU, where CUDA's allocator peak does not exist
        ratio("measured/estimated peak", got["peak"] / est["peak"], "the memory model holds: <= 1.0 on a GPU")


if __name__ == "__main__":
    main()
