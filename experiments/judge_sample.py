"""Draw the generations to label by hand for the four-label judge (issue 28), from a full run.

Every condition of the embedded default's study contributes (Base and AS; each selector's clamp
under both protocols; LA-IG's per-prompt sets; the random control; the induction sweep and AS-add
on harmless prompts; jailbreak-wrapped requests; the refusal guardrail; harmless twins, bait and
the contrast set's safe prompts), a seeded sample each. The rows are split into calibration and
test halves by a hash of the instruction, so one prompt's generations under different conditions
sit on one side. ``label`` is left empty for the labeller (resources/judge/guide.md).

    python experiments/judge_sample.py --run ../run --out resources/judge/labels.tsv
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pandas as pd

# (condition, file under results/, row filter, rows drawn)
DRAWS: list[tuple[str, str, str, int]] = [
    ("base", "generations/{m}/bundled/base.parquet", "label == 'harmful'", 20),
    ("base harmless", "generations/{m}/bundled/base.parquet", "label == 'harmless'", 20),
    ("base contrast safe", "generations/{m}/contrast/base.parquet", "label == 'harmless'", 20),
    ("as", "generations/{m}/bundled/as.parquet", "label == 'harmful'", 20),
    ("la_ig-global-heldout", "generations/{m}/bundled/la_ig-global-heldout.parquet", "label == 'harmful'", 20),
    ("la_ig-global-transductive", "generations/{m}/bundled/la_ig-global-transductive.parquet", "label == 'harmful'", 14),
    ("la_ig-local-heldout", "generations/{m}/bundled/la_ig-local-heldout.parquet", "label == 'harmful'", 14),
    ("la_ig-local-transductive", "generations/{m}/bundled/la_ig-local-transductive.parquet", "label == 'harmful'", 10),
    ("cossim-global-heldout", "generations/{m}/bundled/cossim-global-heldout.parquet", "label == 'harmful'", 10),
    ("cossim-global-transductive", "generations/{m}/bundled/cossim-global-transductive.parquet", "label == 'harmful'", 8),
    ("actdiff-global-heldout", "generations/{m}/bundled/actdiff-global-heldout.parquet", "label == 'harmful'", 10),
    ("actdiff-global-transductive", "generations/{m}/bundled/actdiff-global-transductive.parquet", "label == 'harmful'", 8),
    ("ap-global-heldout", "generations/{m}/bundled/ap-global-heldout.parquet", "label == 'harmful'", 10),
    ("ap-global-transductive", "generations/{m}/bundled/ap-global-transductive.parquet", "label == 'harmful'", 8),
    ("random-global-heldout", "generations/{m}/bundled/random-global-heldout.parquet", "label == 'harmful'", 10),
    ("random-global-transductive", "generations/{m}/bundled/random-global-transductive.parquet", "label == 'harmful'", 8),
    ("add", "generations/{m}/bundled/add.parquet", "label == 'harmless'", 10),
    ("la_ig-global-heldout-s1", "generations/{m}/bundled/la_ig-global-heldout-s1.parquet", "label == 'harmless'", 14),
    ("la_ig-global-heldout-s2", "generations/{m}/bundled/la_ig-global-heldout-s2.parquet", "label == 'harmless'", 14),
    ("la_ig-global-heldout-s4", "generations/{m}/bundled/la_ig-global-heldout-s4.parquet", "label == 'harmless'", 14),
    ("jailbreak-wrapped", "probes/{m}/responses.parquet", "variant == 'jailbreak'", 26),
    ("refusal guardrail", "guardrails/{m}/refusal_tuned.parquet", "condition.str.startswith('guard')", 20),
]


def half(instruction: str) -> str:
    return "calibration" if int(hashlib.sha256(instruction.encode()).hexdigest(), 16) % 2 == 0 else "test"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="the run's directory (holds results/)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, help="a labelled file whose labels carry over, by condition and source_id")
    args = p.parse_args()
    prompts = pd.concat(pd.read_parquet(f) for f in (args.run / "results/promptsets").glob("*.parquet"))
    text = dict(zip(prompts.id, prompts.instruction))
    rows = []
    for condition, path, query, n in DRAWS:
        file = args.run / "results" / path.format(m=args.model)
        if not file.exists():
            print(f"{condition}: {file} not there yet, left out")
            continue
        df = pd.read_parquet(file).query(query, engine="python")
        if "instruction" not in df:  # the guardrail's generations name their prompts by id
            df = df.assign(instruction=df.id.map(text))
        take = df.sample(n=min(n, len(df)), random_state=args.seed)
        rows.append(pd.DataFrame({"condition": condition, "source_id": take["id"].astype(str),
                                  "instruction": take.instruction, "generation": take.generation.fillna("")}))
    out = pd.concat(rows, ignore_index=True)
    out.insert(0, "id", [f"j{i:03d}" for i in range(len(out))])
    out["label"] = ""
    if args.keep is not None and args.keep.exists():
        old = pd.read_csv(args.keep, sep="\t", dtype=str, keep_default_na=False)
        done = dict(zip(zip(old.condition, old.source_id), old.label))
        out["label"] = [done.get(k, "") for k in zip(out.condition, out.source_id)]
    out["split"] = out.instruction.map(half)
    out.to_csv(args.out, sep="\t", index=False)
    print(f"{len(out)} rows -> {args.out}; by half: {out.split.value_counts().to_dict()}")


if __name__ == "__main__":
    main()
