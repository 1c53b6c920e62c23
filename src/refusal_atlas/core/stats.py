"""Rates with their n and a percentile-bootstrap 95% interval (every rate the workflow reports)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Rate:
    rate: float
    n: int
    ci_low: float
    ci_high: float
    confidence: float = 0.95

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.rate:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] (n={self.n})"


def bootstrap_rate(
    outcomes: np.ndarray | list[bool] | list[float],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Rate:
    """Mean of 0/1 outcomes with a percentile bootstrap interval (scipy.stats.bootstrap).

    A sample with no variation has a degenerate bootstrap distribution; its interval is the point.
    """
    x = np.asarray(outcomes, dtype=float)
    if x.size == 0:
        raise ValueError("cannot compute a rate from zero outcomes")
    mean = float(x.mean())
    if np.all(x == x[0]):
        return Rate(mean, int(x.size), mean, mean, confidence)
    from scipy.stats import bootstrap  # not at the top: the vLLM judge's environment has no scipy

    res = bootstrap(
        (x,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return Rate(mean, int(x.size), float(ci.low), float(ci.high), confidence)


def bootstrap_mean(values: np.ndarray | list[float], **kwargs) -> Rate:
    """A mean of real values (e.g. per-response CE) with the same percentile bootstrap interval."""
    return bootstrap_rate(values, **kwargs)


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|, 0 for two empty sets: how far two feature sets agree."""
    return len(a & b) / max(1, len(a | b))
