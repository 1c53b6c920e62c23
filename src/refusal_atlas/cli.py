"""``refusal-atlas``: the project's stable commands, whatever the modules behind them.

    refusal-atlas judge --in GENERATIONS.parquet --out LABELS.parquet
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_BASE = Path("results/models/smollm2-135m/base")
DEFAULT_LABELLED = Path(__file__).resolve().parents[2] / "resources/judge/labels.tsv"


def _judge(args: argparse.Namespace) -> None:
    import pandas as pd

    from refusal_atlas.core.io import write_parquet
    from refusal_atlas.lm.modeling import load_model
    from refusal_atlas.pipeline.judging import agreement_tables, calibrate, judge_generations, read_labelled

    if not args.base_model.is_dir():
        sys.exit(f"refusal-atlas judge: no base model at {args.base_model}; give --base-model, or run "
                 "`snakemake --cores 2 results/models/smollm2-135m/base` first")
    generations = pd.read_parquet(args.input)
    model, tok = load_model(args.base_model)
    judge, rows = calibrate(read_labelled(args.calibration), model, tok, batch_size=args.batch_size)
    overall, _, _ = agreement_tables(rows, ["fourlabel", "substring"])
    labelled = judge_generations(generations, judge, model, tok, args.batch_size)
    write_parquet(labelled, args.out)
    print(f"thresholds {judge.thresholds.as_dict()}")
    print("agreement with the hand labels on the held-out half:")
    print(overall.round(3).to_string(index=False))
    print(f"{len(labelled)} generations -> {args.out}:")
    print(labelled.label.value_counts().to_string())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="refusal-atlas", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    j = sub.add_parser("judge", help="label generations refusal, compliance, evasive or degenerate",
                       description="Label each generation with the four-label judge (calibrated on the hand-labelled "
                                   "set) and write every signal's score beside it.")
    j.add_argument("--in", dest="input", type=Path, required=True,
                   help="Parquet with columns instruction and generation (others are passed through)")
    j.add_argument("--out", type=Path, required=True, help="Parquet written with label and the signals")
    j.add_argument("--base-model", type=Path, default=DEFAULT_BASE,
                   help=f"reference model of the relevance signal (default: {DEFAULT_BASE})")
    j.add_argument("--calibration", type=Path, default=DEFAULT_LABELLED,
                   help="hand-labelled set whose calibration half fits the thresholds (default: the bundled one)")
    j.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "judge":
        _judge(args)


if __name__ == "__main__":
    main()
