"""Per-category refusal features: common vs specific sets and their clamp conditions.

Yeo et al. 2025, §4.2: for each harm category, a difference-in-means direction r_cat (Arditi et
al. 2024) and LA-IG (Eq. 4) with it give a global set F*_cat. Then

    common        = ∩_cat F*_cat
    specific_cat  = F*_cat \\ common, truncated to its top |common| by score
    conditions    all (F*_cat), specific (specific_cat), common, and transfer: another
                  category's specific set, averaged over the other categories

and each is scored by the normalized jailbreak rate, jailbreak(condition) / jailbreak(all).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch

CONDITIONS = ("all", "specific", "common", "transfer")


def common_features(sets: pd.DataFrame, min_fraction: float = 1.0) -> pd.DataFrame:
    """Features in the sets of at least ``min_fraction`` of the categories (1.0: the intersection).

    ``sets`` has one row per (category, layer, feature) with ``score``; the result has one row
    per common feature with its mean score over the categories that hold it.
    """
    n_cat = sets.category.nunique()
    counts = sets.groupby(["layer", "feature"]).agg(n=("category", "nunique"), score=("score", "mean")).reset_index()
    need = max(1, -(-round(min_fraction * n_cat * 1000) // 1000))  # ceil, robust to float error
    return counts[counts.n >= need].sort_values("score", ascending=False, ignore_index=True)


def specific_features(sets: pd.DataFrame, common: pd.DataFrame, category: str, size: int | None = None) -> pd.DataFrame:
    """F*_cat minus the common features, its top ``size`` by score (``size=None``: all of them)."""
    own = sets[sets.category == category].sort_values("score", ascending=False)
    key = set(zip(common.layer, common.feature))
    own = own[[k not in key for k in zip(own.layer, own.feature)]]
    return own if size is None else own.head(size)


def condition_sets(sets: pd.DataFrame, min_fraction: float = 1.0, truncate: bool = True
                   ) -> tuple[pd.DataFrame, dict[tuple[str, str, str], pd.DataFrame]]:
    """``(common, {(category, condition, source): features})`` for every clamp of §4.2.

    ``source`` is the category whose set is clamped: the category itself, except for transfer,
    where it is each other category (its specific set, clamped on this category's prompts).
    Specific sets are truncated to |common| (``truncate``), so that specific and common clamps
    move the same number of features; with no common feature they are left whole and the
    truncation is reported as not applied.
    """
    common = common_features(sets, min_fraction)
    size = len(common) if truncate and len(common) else None
    cats = sorted(sets.category.unique())
    specific = {c: specific_features(sets, common, c, size) for c in cats}
    out: dict[tuple[str, str, str], pd.DataFrame] = {}
    for c in cats:
        out[(c, "all", c)] = sets[sets.category == c]
        out[(c, "specific", c)] = specific[c]
        out[(c, "common", c)] = common
        for other in cats:
            if other != c:
                out[(c, "transfer", other)] = specific[other]
    return common, out


def normalized_jailbreak(rates: pd.DataFrame) -> pd.DataFrame:
    """Per category and condition: jailbreak rate / the rate of ``all`` (transfer averaged over sources).

    ``rates`` has columns category, condition, source, jailbreak_rate, n, ci_low, ci_high; the
    normalized interval divides the condition's interval by the point rate of ``all``.
    """
    mean = (rates.groupby(["category", "condition"], sort=False)
            .agg(jailbreak_rate=("jailbreak_rate", "mean"), ci_low=("ci_low", "mean"), ci_high=("ci_high", "mean"),
                 n=("n", "first"), n_sources=("source", "nunique"), n_features=("n_features", "mean"))
            .reset_index())
    ref = mean[mean.condition == "all"].set_index("category").jailbreak_rate
    denom = mean.category.map(ref)
    ok = denom > 0
    for col, src in (("normalized", "jailbreak_rate"), ("normalized_ci_low", "ci_low"),
                     ("normalized_ci_high", "ci_high")):
        mean[col] = (mean[src] / denom).where(ok)
    return mean


def summarize_conditions(normalized: pd.DataFrame, conditions: Sequence[str] = CONDITIONS) -> pd.DataFrame:
    """The mean normalized jailbreak of each condition over the categories where ``all`` jailbreaks."""
    rows = []
    for cond in conditions:
        g = normalized[(normalized.condition == cond) & normalized.normalized.notna()]
        rows.append({"condition": cond, "mean_normalized": float(g.normalized.mean()) if len(g) else float("nan"),
                     "n_categories": int(len(g))})
    return pd.DataFrame(rows)


def category_directions(acts, index: pd.DataFrame, categories: Sequence[str], split: str, harmless: str = "all",
                        min_prompts: int = 2) -> Mapping[str, object]:
    """Difference-in-means r_cat per layer ``[L, d]`` from last-token activations ``acts [n, L, d]``.

    Harmful: the category's plain harmful prompts of ``split``; harmless: every plain or twin
    harmless prompt of ``split`` (``all``), only the category's twins (``twins``), or only its
    safe prompts that look unsafe (``bait``: OR-Bench's hard prompts of the same category).
    """
    rows = index[index.split == split]
    out = {}
    for c in categories:
        harm = rows[(rows.label == "harmful") & (rows.variant == "plain") & (rows.category == c)]
        safe = rows[(rows.label == "harmless") & rows.variant.isin(["plain", "twin"])]
        if harmless in ("twins", "bait"):
            variant = {"twins": "twin", "bait": "bait"}[harmless]
            safe = rows[(rows.label == "harmless") & (rows.category == c) & (rows.variant == variant)]
        if len(harm) < min_prompts or len(safe) < min_prompts:
            raise ValueError(f"category {c!r} has {len(harm)} harmful and {len(safe)} harmless {split} prompts; "
                             f"a direction needs at least {min_prompts} of each")
        out[c] = (acts[torch.as_tensor(harm.row.to_numpy(copy=True))].float().mean(0)
                  - acts[torch.as_tensor(safe.row.to_numpy(copy=True))].float().mean(0))
    return out
