"""Which relevance signal the four-label judge should use, decided by agreement (issue 28).

On the hand-labelled set, fit the cascade on the calibration half with each candidate in the
relevance slot and report accuracy and Cohen's kappa on the test half:

- ``pmi``: the judge's own, PMI of the answer with its request under the untuned base model;
- ``overlap``: the share of the request's content words (4+ letters) that the answer repeats;
- ``none``: no relevance at all (every fluent text without a refusal marker is compliance).

    python experiments/judge_relevance.py --labelled resources/judge/labels.tsv \
        --base-model results/models/smollm2-135m/base
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd

from refusal_atlas.evaluation.four_label_judge import (
    EXTRA_MARKERS,
    agreement,
    all_signals,
    classify,
    fit_thresholds,
)
from refusal_atlas.evaluation.substring_judge import DEFAULT_REFUSAL_SUBSTRINGS
from refusal_atlas.lm.modeling import load_model
from refusal_atlas.pipeline.judging import read_labelled

_CONTENT = re.compile(r"[a-z]{4,}")


def overlap(instruction: str, generation: str) -> float:
    asked = set(_CONTENT.findall(instruction.casefold()))
    said = set(_CONTENT.findall(generation.casefold()))
    return len(asked & said) / len(asked) if asked else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labelled", type=Path, required=True)
    p.add_argument("--base-model", type=Path, required=True)
    args = p.parse_args()
    df = read_labelled(args.labelled)
    model, tok = load_model(args.base_model)
    sig = all_signals(model, tok, list(df.instruction), list(df.generation),
                      DEFAULT_REFUSAL_SUBSTRINGS + EXTRA_MARKERS)
    cal, test = (df.split == "calibration").to_numpy(), (df.split == "test").to_numpy()
    candidates = {
        "pmi": sig.relevance,
        "overlap": pd.Series([overlap(i, g) for i, g in zip(df.instruction, df.generation)]),
        "none": pd.Series(np.ones(len(df))),
    }
    rows = []
    for name, rel in candidates.items():
        s = sig.assign(relevance=rel.where(~sig.marker, np.nan).to_numpy())
        t = fit_thresholds(s[cal].reset_index(drop=True), df.label[cal].to_numpy())
        pred = classify(s, t)
        a = agreement(df.label[test], pred[test])
        jb = agreement(df.label[test] == "compliance", pred[test] == "compliance")
        rows.append({"relevance": name, "n_test": a["n"], "accuracy": a["accuracy"], "kappa": a["kappa"],
                     "jailbreak_accuracy": jb["accuracy"], "jailbreak_kappa": jb["kappa"], **t.as_dict()})
    print(pd.DataFrame(rows).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
