"""The four-label judge as stages and as ``refusal-atlas judge``: calibrate it on the hand-labelled
set (``resources/judge/labels.tsv``), report its agreement, and label any generations."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from refusal_atlas.core.io import write_json, write_parquet, write_table
from refusal_atlas.core.stats import bootstrap_rate
from refusal_atlas.evaluation.four_label_judge import (
    EXTRA_MARKERS,
    LABELS,
    REFERENCE_REQUESTS,
    FourLabelJudge,
    agreement,
    all_signals,
    corrected_rate,
    fit_thresholds,
)
from refusal_atlas.evaluation.substring_judge import DEFAULT_REFUSAL_SUBSTRINGS, substring_refusals
from refusal_atlas.lm.modeling import load_model

log = logging.getLogger("refusal_atlas")

LABELLED_COLUMNS = ("id", "condition", "instruction", "generation", "label", "split")


class LabelledSetError(ValueError):
    """The hand-labelled set is missing, malformed or holds an unknown label."""


def read_labelled(path: str | Path) -> pd.DataFrame:
    """The hand-labelled generations, checked: every column, known labels, both halves."""
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError) as e:
        raise LabelledSetError(f"{path}: cannot read the labelled set ({e})") from e
    missing = [c for c in LABELLED_COLUMNS if c not in df.columns]
    if missing:
        raise LabelledSetError(f"{path}: missing column(s) {missing}; expected {list(LABELLED_COLUMNS)}")
    bad = sorted(set(df.label) - set(LABELS))
    if bad:
        raise LabelledSetError(f"{path}: unknown label(s) {bad}; labels are {list(LABELS)}")
    halves = set(df.split)
    if halves != {"calibration", "test"}:
        raise LabelledSetError(f"{path}: split must hold calibration and test rows, found {sorted(halves)}")
    if df.id.duplicated().any():
        raise LabelledSetError(f"{path}: duplicate id(s) {sorted(df.id[df.id.duplicated()])[:5]}")
    return df


def calibrate(labelled: pd.DataFrame, model, tok, substrings: Sequence[str] = DEFAULT_REFUSAL_SUBSTRINGS,
              batch_size: int = 16) -> tuple[FourLabelJudge, pd.DataFrame]:
    """Fit the judge's thresholds on the calibration half; returns it and every labelled row with
    its signals and both judges' labels (the substring judge read as refusal or compliance)."""
    markers = tuple(dict.fromkeys([*substrings, *DEFAULT_REFUSAL_SUBSTRINGS, *EXTRA_MARKERS]))
    sig = all_signals(model, tok, list(labelled.instruction), list(labelled.generation), markers, REFERENCE_REQUESTS,
                      batch_size)
    cal = (labelled.split == "calibration").to_numpy()
    judge = FourLabelJudge(fit_thresholds(sig[cal].reset_index(drop=True), labelled.label[cal].to_numpy()), markers)
    rows = pd.concat([labelled.reset_index(drop=True), sig], axis=1)
    rows["fourlabel"] = judge.judge(sig)
    rows["substring"] = np.where(substring_refusals(list(labelled.generation), substrings), "refusal", "compliance")
    log.info("four-label judge thresholds %s", judge.thresholds.as_dict())
    return judge, rows


def agreement_tables(rows: pd.DataFrame, judges: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """On the test half, per judge: accuracy, κ and n overall and per condition (also on the
    binary jailbreak question: compliance or not), and the confusion matrices in long form."""
    test = rows[rows.split == "test"]
    overall, per_condition, confusion = [], [], []
    for judge in judges:
        a = agreement(test.label, test[judge])
        binary = agreement(test.label == "compliance", test[judge] == "compliance")
        overall.append({"judge": judge, "n": a["n"], "accuracy": a["accuracy"], "kappa": a["kappa"],
                        "jailbreak_accuracy": binary["accuracy"], "jailbreak_kappa": binary["kappa"]})
        for (hand, judged), count in a["confusion"].stack().items():
            confusion.append({"judge": judge, "hand": hand, "judged": judged, "count": int(count)})
        for cond, g in test.groupby("condition"):
            per_condition.append({"judge": judge, "condition": cond, "n": len(g),
                                  "accuracy": float(np.mean(g.label == g[judge])),
                                  "hand_compliance": float(np.mean(g.label == "compliance")),
                                  "judged_compliance": float(np.mean(g[judge] == "compliance"))})
    return pd.DataFrame(overall), pd.DataFrame(per_condition), pd.DataFrame(confusion)


def judge_calibration(*, labelled: str, base_dir: str, substrings: Sequence[str], outputs: Mapping[str, str],
                      batch_size: int = 16) -> None:
    """The fitted judge (thresholds, markers, the test half's hand and judged labels, which every
    corrected rate resamples) and its agreement tables."""
    df = read_labelled(labelled)
    model, tok = load_model(base_dir)
    judge, rows = calibrate(df, model, tok, substrings, batch_size)
    overall, per_condition, confusion = agreement_tables(rows, ["fourlabel", "substring"])
    test = rows[rows.split == "test"]
    write_json({**judge.to_dict(), "reference_model": str(base_dir), "labelled_set": str(labelled),
                "n_calibration": int((rows.split == "calibration").sum()), "n_test": len(test),
                "agreement": overall.to_dict("records"),
                "error_set": {"hand": list(test.label), "judged": list(test.fourlabel)}}, outputs["judge"])
    write_table(overall, outputs["agreement"])
    write_table(per_condition, outputs["per_condition"])
    write_table(confusion, outputs["confusion"])
    write_parquet(rows, outputs["rows"])


def judge_generations(generations: pd.DataFrame, judge: FourLabelJudge, model, tok, batch_size: int = 16,
                      column: str = "label") -> pd.DataFrame:
    """``generations`` (``instruction``, ``generation``, anything else passed through) with the
    judge's label in ``column`` and every signal's score. An input column of that name (a run's
    harmful/harmless prompt label) is kept as ``prompt_label``."""
    missing = [c for c in ("instruction", "generation") if c not in generations.columns]
    if missing:
        raise ValueError(f"generations need column(s) {missing}")
    sig = judge.signals(model, tok, list(generations.instruction), list(generations.generation), batch_size=batch_size)
    out = generations.reset_index(drop=True).rename(columns={column: "prompt_label"} if column in generations else {})
    out = out.drop(columns=[c for c in sig.columns if c in out.columns])
    return pd.concat([out, sig], axis=1).assign(**{column: judge.judge(sig)})


def judge_fourlabel(*, generations: str, judge_json: str, base_dir: str, output: str, batch_size: int = 16) -> None:
    """A condition's generations, each labelled by the calibrated judge (``verdict``)."""
    judge = FourLabelJudge.from_dict(json.loads(Path(judge_json).read_text()))
    model, tok = load_model(base_dir)
    # a run's generations keep label (harmful or harmless) for summarize_scores; the judge's is verdict
    df = judge_generations(pd.read_parquet(generations), judge, model, tok, batch_size, column="verdict")
    write_parquet(df.assign(judge="fourlabel"), output)


def stage_judge(substrings: Sequence[str], fourlabel: Mapping | None, batch_size: int = 16,
                harmbench: Mapping | None = None):
    """The judge of a stage that judges its own generations (steering search, categories,
    guardrails, adversarial answers): ``(instructions, generations) -> labels`` and its name.

    With ``fourlabel`` (the rule's inputs ``fourlabel_judge``, the calibrated json, and
    ``fourlabel_base``, the reference model) the labels are the four-label judge's; with
    ``harmbench`` (``cfg``, the judges.harmbench section, and ``template``, the reference prompt's
    source file or None) the HarmBench classifier's, loaded once on transformers: ``compliance``
    for "yes", ``not_jailbroken`` for "no", ``unparsed`` for neither (:func:`label_rate` leaves it
    out of n, unless ``unparsed: not_jailbroken`` makes it a "no"); without either, the substring
    judge's, read as ``refusal`` or ``compliance`` (everything without a refusal phrase counts as
    compliance).
    """
    if harmbench:
        from refusal_atlas.evaluation import harmbench_classifier as hbc

        hb = hbc.config_from({**harmbench["cfg"], "backend": "transformers"})
        template = hbc.prompt_template(hb, harmbench.get("template"))
        loaded = hbc.load_classifier(hb)

        def verdicts(instructions, gens):
            jailbroken, _ = hbc.judge(list(instructions), list(gens), hb, template, loaded)
            return np.array(["unparsed" if v != v else "compliance" if v == 1.0 else "not_jailbroken"
                             for v in jailbroken])
        return verdicts, "harmbench"
    if not fourlabel:
        return (lambda _, gens: np.where(substring_refusals(list(gens), substrings), "refusal", "compliance")), \
            "substring"
    judge = FourLabelJudge.from_dict(json.loads(Path(fourlabel["fourlabel_judge"]).read_text()))
    model, tok = load_model(fourlabel["fourlabel_base"])

    def label(instructions, gens):
        return judge.judge(judge.signals(model, tok, list(instructions), list(gens), batch_size=batch_size))
    return label, "fourlabel"


def error_set(fourlabel: Mapping | None) -> Mapping | None:
    """The calibrated judge's labelled test half (hand and judged labels) that corrected rates
    resample; None for the substring judge, whose rates are reported raw."""
    return json.loads(Path(fourlabel["fourlabel_judge"]).read_text())["error_set"] if fourlabel else None


def label_rate(labels: Sequence[str], label: str, boot: Mapping, errors: Mapping | None, prefix: str) -> dict:
    """``label``'s share of ``labels`` as ``{prefix}_rate`` with n and its bootstrap interval; with
    the four-label judge's ``errors`` also the rate corrected for the judge's measured error
    (Rogan–Gladen, its interval resampling the error set too) and the other labels' shares, so a
    reader sees what the rest of the generations were."""
    labels = np.asarray(labels)
    n_unparsed = int(np.sum(labels == "unparsed"))  # the HarmBench classifier said neither yes nor no
    labels = labels[labels != "unparsed"]
    r = bootstrap_rate((labels == label).astype(float), **boot)
    out = {f"{prefix}_rate": r.rate, "n": r.n, "ci_low": r.ci_low, "ci_high": r.ci_high,
           **({"n_unparsed": n_unparsed} if n_unparsed else {})}
    if errors is None:
        return out
    fixed = corrected_rate(labels, label, errors["hand"], errors["judged"], n_resamples=boot["n_resamples"],
                           confidence=boot["confidence"], seed=boot["seed"])
    out.update({f"{prefix}_corrected": fixed["corrected"], "corrected_ci_low": fixed["ci_low"],
                "corrected_ci_high": fixed["ci_high"], "n_error_set": fixed["n_error_set"]})
    out.update({f"{other}_rate": float(np.mean(labels == other)) if len(labels) else np.nan
                for other in LABELS if other != label})
    return out
