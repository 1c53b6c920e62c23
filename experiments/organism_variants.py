"""Choose the organism's training settings on the val splits (issue 25); never reads test.

Each variant overrides keys of config/config.yaml's ``organism`` section, tunes the prepared base
model with them exactly as the ``refusal_tune`` rule does, and counts refusals (substring judge,
greedy, ``eval_max_new_tokens``) on every val split: bundled, refusal_direction and the contrast
set per type. One row per variant is appended to ``--out``; docs/architecture.md keeps the table.

    python experiments/organism_variants.py --name v1 --set '{"contrastive_repeats": 4}'

Run it after ``snakemake --cores 2 results/models/smollm2-135m/base results/promptsets/...``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from refusal_atlas.evaluation.substring_judge import substring_refusals
from refusal_atlas.lm.generation import generate
from refusal_atlas.lm.modeling import load_model
from refusal_atlas.lm.organism import build_examples
from refusal_atlas.lm.organism import refusal_tune as tune
from refusal_atlas.pipeline.model import _organism_config, organism_training_prompts, training_frames

ROOT = Path(__file__).resolve().parents[1]


def val_counts(model, tok, frames: dict[str, pd.DataFrame], organism: dict) -> tuple[dict, pd.DataFrame]:
    rows = []
    for name, df in frames.items():
        val = df[(df.split == "val") & (df.variant != "jailbreak")].copy()
        val["generation"] = generate(model, tok, list(val.instruction), max_new_tokens=organism["eval_max_new_tokens"],
                                     batch_size=organism["generation_batch_size"], desc=f"val {name}")
        val["refused"] = substring_refusals(list(val.generation))
        val["promptset"] = name
        rows.append(val)
    gens = pd.concat(rows, ignore_index=True)
    counts = {}
    for (ps, label, variant), g in gens.groupby(["promptset", "label", "variant"]):
        counts[f"{ps}/{label}/{variant}"] = f"{int(g.refused.sum())}/{len(g)}"
    safe = gens[(gens.promptset == "contrast") & (gens.label == "harmless")]
    for t, g in safe.groupby("category"):
        counts[f"contrast safe {t}"] = f"{int(g.refused.sum())}/{len(g)}"
    return counts, gens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--set", default="{}", help="JSON overrides of the organism section")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=Path("experiments/organism_variants.jsonl"))
    p.add_argument("--untuned", action="store_true", help="measure the base model, no tuning")
    p.add_argument("--promptsets", type=Path, default=None,
                   help="directory of promptset parquets to train and measure on (default results/promptsets)")
    args = p.parse_args()
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    organism = {"seed": 0, **cfg["organism"], **json.loads(args.set)}
    results = ROOT / "results"
    psdir = args.promptsets or results / "promptsets"
    frames = {n: pd.read_parquet(psdir / f"{n}.parquet") for n in organism["eval_promptsets"]}
    model, tok = load_model(str(results / f"models/{args.model}/base"))
    t0 = time.time()
    info: dict = {}
    if not args.untuned:
        ocfg = _organism_config(organism)
        files = {n: str(psdir / f"{n}.parquet") for n in organism["train_promptsets"]}
        harmful, harmless = organism_training_prompts(
            training_frames(files, organism),
            organism["max_harmful"], organism["harmless_per_harmful"], organism["contrastive_repeats"],
            organism["seed"], organism.get("contrastive_weight", 1.0))
        examples = build_examples(model, tok, harmful, harmless, ocfg)
        log = tune(model, tok, examples, ocfg)
        info = {"n_harmful": len(harmful), "n_harmless_examples": sum(h.repeats for h in harmless),
                "steps": log["steps"], "tune_seconds": round(time.time() - t0, 1)}
    counts, gens = val_counts(model, tok, frames, organism)
    row = {"name": args.name, "set": json.loads(args.set), **info, **counts}
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    gens.to_parquet(args.out.with_name(f"{args.name}.val.parquet"))
    print(json.dumps(row, indent=1))
    safe = gens[(gens.promptset == "contrast") & (gens.label == "harmless")]
    print("contrast safe val refused", np.mean(safe.refused), len(safe))


if __name__ == "__main__":
    main()
