"""Shared helpers of the benchmark suite: the subject model, timing, and the closing ratio line.

Every script measures a hot path of refusal-atlas against a bare reference in the same process
and prints ``ratio <name> = <x> (goal ...)`` last. ``--smoke`` swaps in a tiny random model so
the whole suite runs in seconds (CI runs it that way through tests/pipeline/test_bench.py).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

EMBEDDED = ROOT / "results/models/smollm2-135m/tuned"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny random model, seconds (CI)")
    p.add_argument("--model", type=Path, default=EMBEDDED, help="HF model directory (default: the embedded organism)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    return p


def prompts(n: int) -> list[str]:
    import pandas as pd

    pairs = pd.read_csv(ROOT / "resources/prompts/pairs.tsv", sep="\t")
    out = list(pairs.harmful) + list(pairs.harmless)
    return (out * (n // len(out) + 1))[:n]


def subject(args):
    """(model, tokenizer): the tiny random chat model in smoke mode, else ``--model``."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        from refusal_atlas.testing.synthetic import chat_tokenizer, tiny_llama

        tok = chat_tokenizer(prompts(200))
        return tiny_llama(tok, n_layers=4).to(args.device), tok
    if not (args.model / "config.json").exists():
        sys.exit(f"{args.model} is not an HF model directory: run the default DAG first "
                 "(snakemake --cores 2) or pass --model")
    from refusal_atlas.lm.modeling import load_model

    return load_model(args.model, dtype="float32", device=args.device)


def hooked_twin(cfg, n_ctx: int, device: str):
    """A random TransformerLens HookedTransformer with the same shape as an HF Llama-style ``cfg``:
    the same compute, for comparing TransformerLens code paths with ours."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    head = cfg.hidden_size // cfg.num_attention_heads
    return HookedTransformer(HookedTransformerConfig(
        n_layers=cfg.num_hidden_layers, d_model=cfg.hidden_size, n_ctx=n_ctx, d_head=head,
        n_heads=cfg.num_attention_heads, n_key_value_heads=cfg.num_key_value_heads, d_mlp=cfg.intermediate_size,
        d_vocab=cfg.vocab_size, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        gated_mlp=True, rotary_dim=head, device=device, seed=0,
    )).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, device: str = "cpu") -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def ratio(name: str, value: float, goal: str) -> None:
    print(f"ratio {name} = {value:.3f} ({goal})", flush=True)
