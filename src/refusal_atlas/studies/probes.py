"""Linear probes on refusal features, tested out of distribution (Yeo et al. 2025, §4.3).

A logistic-regression probe is trained on last-prompt-token activations to tell vanilla harmful
requests from benign ones, then tested on two slices: held-out vanilla prompts (label: harmful
or not) and adversarial prompts (label: does the model refuse). Three inputs are compared:

- the SAE activations of the selected refusal features F*;
- ``n_random`` random feature sets of the same per-layer sizes, drawn from live latents, which
  give a distribution rather than one lucky draw;
- the dense residual stream of one layer, the layer chosen on the validation split and then
  tested on that same layer (the reference tested on another one).

The regularisation C is chosen on validation accuracy for every probe alike. Features are
standardised with statistics of the training split only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


@dataclass
class ProbeConfig:
    c_grid: Sequence[float] = (0.01, 0.1, 1.0, 10.0)
    n_random: int = 10
    seed: int = 0
    max_iter: int = 5000


@dataclass
class Split:
    """Inputs ``x`` ``[n, d]`` and 0/1 labels ``y`` of one split or test slice."""

    x: np.ndarray
    y: np.ndarray
    ids: list[str] = field(default_factory=list)


@dataclass
class FittedProbe:
    model: object
    c: float
    val_accuracy: float
    val_auroc: float


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else np.nan


def fit_probe(train: Split, val: Split, cfg: ProbeConfig) -> FittedProbe:
    """The best-on-validation probe over ``cfg.c_grid`` (accuracy, then AUROC, then smaller C)."""
    if len(np.unique(train.y)) < 2:
        raise ValueError("the probe's training split needs both classes")
    best = None
    for c in sorted(cfg.c_grid):
        probe = make_pipeline(StandardScaler(),
                              LogisticRegression(C=c, max_iter=cfg.max_iter, random_state=cfg.seed))
        probe.fit(train.x, train.y)
        acc = float((probe.predict(val.x) == val.y).mean())
        auc = _auroc(val.y, probe.predict_proba(val.x)[:, 1])
        key = (acc, np.nan_to_num(auc, nan=0.0))
        if best is None or key > best[0]:
            best = (key, FittedProbe(probe, c, acc, auc))
    return best[1]


def bootstrap_metrics(y: np.ndarray, score: np.ndarray, *, n_resamples: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> dict[str, dict[str, float]]:
    """Accuracy (threshold 0.5) and AUROC with percentile bootstrap intervals over prompts.

    A resample with one class has no AUROC and is skipped; a slice with one class has none at all.
    """
    y, score = np.asarray(y), np.asarray(score)
    pred = score >= 0.5
    rng = np.random.default_rng(seed)
    n = len(y)
    accs, aucs = [], []
    for _ in range(n_resamples):
        i = rng.integers(0, n, n)
        accs.append((pred[i] == y[i]).mean())
        if len(np.unique(y[i])) == 2:
            aucs.append(roc_auc_score(y[i], score[i]))
    lo, hi = (1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100

    def summary(value, draws):
        if not draws or np.isnan(value):
            return {"value": value, "ci_low": np.nan, "ci_high": np.nan, "n": n}
        return {"value": value, "ci_low": float(np.percentile(draws, lo)),
                "ci_high": float(np.percentile(draws, hi)), "n": n}

    return {"accuracy": summary(float((pred == y).mean()), accs), "auroc": summary(_auroc(y, score), aucs)}


def random_feature_sets(sizes: Mapping[int, int], live: Mapping[int, np.ndarray], n_sets: int, seed: int,
                        exclude: Mapping[int, Sequence[int]] | None = None) -> list[dict[int, np.ndarray]]:
    """``n_sets`` random sets with ``sizes[l]`` live latents at each layer l, never one of
    ``exclude`` (the refusal features themselves)."""
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(n_sets):
        s = {}
        for layer, k in sizes.items():
            pool = np.flatnonzero(live[layer])
            pool = np.setdiff1d(pool, np.asarray((exclude or {}).get(layer, []), dtype=int))
            if len(pool) < k:
                raise ValueError(f"layer {layer}: {len(pool)} live latents, a random set needs {k}")
            s[layer] = np.sort(rng.choice(pool, size=k, replace=False))
        sets.append(s)
    return sets


def evaluate_probe(name: str, fitted: FittedProbe, tests: Mapping[str, Split], boot: Mapping,
                   **extra) -> list[dict]:
    """One row per test slice and metric."""
    rows = []
    for slice_name, split in tests.items():
        if len(split.y) == 0:
            continue
        score = fitted.model.predict_proba(split.x)[:, 1]
        for metric, m in bootstrap_metrics(split.y, score, **boot).items():
            rows.append({"probe": name, "slice": slice_name, "metric": metric, **m, "c": fitted.c,
                         "val_accuracy": fitted.val_accuracy, "positives": int(split.y.sum()), **extra})
    return rows


def best_dense_layer(train: Mapping[int, Split], val: Mapping[int, Split], cfg: ProbeConfig) -> tuple[int, FittedProbe,
                                                                                                       pd.DataFrame]:
    """The layer whose dense probe is best on validation (accuracy, then AUROC, then the lower
    layer), its probe, and every layer's validation scores."""
    rows, best = [], None
    for layer in sorted(train):
        fitted = fit_probe(train[layer], val[layer], cfg)
        rows.append({"layer": layer, "val_accuracy": fitted.val_accuracy, "val_auroc": fitted.val_auroc,
                     "c": fitted.c})
        key = (fitted.val_accuracy, np.nan_to_num(fitted.val_auroc, nan=0.0))
        if best is None or key > best[0]:
            best = (key, layer, fitted)
    return best[1], best[2], pd.DataFrame(rows)
