"""Which relevance signal the four-label judge should use, decided by agreement (issue 28).

On the hand-labelled set, fit the cascade on the calibration half with each candidate in the
relevance slot and report accuracy and Cohen's kappa on the test half, beside a 5-fold
cross-validated accuracy inside the calibration half (the number to choose by: the test half
only reports) and the seconds its model passes took:

- ``pmi``: the judge's own, PMI of the answer with its request under the untuned base model,
  against three unrelated reference requests;
- ``pmi-1ref``: the same against the first reference request alone (half the model passes);
- ``overlap``: the share of the request's content words (4+ letters) that the answer repeats;
- ``none``: no relevance at all (every fluent text without a refusal marker is compliance).

    python experiments/judge_relevance.py --labelled resources/judge/labels.tsv \
        --base-model results/models/smollm2-135m/base
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from refusal_atlas.evaluation.four_label_judge import (
    EXTRA_MARKERS,
    REFERENCE_REQUESTS,
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
    markers = DEFAULT_REFUSAL_SUBSTRINGS + EXTRA_MARKERS
    ins, gens = list(df.instruction), list(df.generation)
    started = time.perf_counter()
    sig = all_signals(model, tok, ins, gens, markers)
    seconds = {"pmi": time.perf_counter() - started}
    started = time.perf_counter()
    one = all_signals(model, tok, ins, gens, markers, references=REFERENCE_REQUESTS[:1])
    seconds["pmi-1ref"] = time.perf_counter() - started
    cal, test = (df.split == "calibration").to_numpy(), (df.split == "test").to_numpy()
    candidates = {
        "pmi": sig,
        "pmi-1ref": one,
        "overlap": sig.assign(relevance=[overlap(i, g) for i, g in zip(ins, gens)]),
        "none": sig.assign(relevance=1.0),
    }
    cal_rows = np.flatnonzero(cal)
    # folds by prompt, as the halves are split, so no prompt is on both sides of a fold
    prompts = df.instruction.to_numpy()[cal_rows]
    unique = np.unique(prompts)
    fold_of = dict(zip(unique, np.random.default_rng(0).permutation(len(unique)) % 5))
    folds = np.array([fold_of[x] for x in prompts])
    rows = []
    for name, cand in candidates.items():
        s = cand.assign(relevance=cand.relevance.where(~cand.marker, np.nan))
        hits = []
        for k in range(5):
            fit_rows, held = cal_rows[folds != k], cal_rows[folds == k]
            t = fit_thresholds(s.iloc[fit_rows].reset_index(drop=True), df.label.to_numpy()[fit_rows])
            hits.extend(classify(s.iloc[held].reset_index(drop=True), t) == df.label.to_numpy()[held])
        t = fit_thresholds(s[cal].reset_index(drop=True), df.label[cal].to_numpy())
        pred = classify(s, t)
        a = agreement(df.label[test], pred[test])
        jb = agreement(df.label[test] == "compliance", pred[test] == "compliance")
        rows.append({"relevance": name, "cv_accuracy": float(np.mean(hits)), "n_test": a["n"],
                     "accuracy": a["accuracy"], "kappa": a["kappa"], "jailbreak_accuracy": jb["accuracy"],
                     "jailbreak_kappa": jb["kappa"], "seconds": seconds.get(name, 0.0), **t.as_dict()})
    print(pd.DataFrame(rows).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
