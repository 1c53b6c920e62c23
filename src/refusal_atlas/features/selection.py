"""Refusal-feature selection: CosSim, ActDiff, AP and LA-IG ("Ours"), global and per prompt.

Yeo et al. 2025, §3.2-3.3 and Table 1. Every method ranks (layer, latent) pairs over all SAE
layers and keeps the top K*:

- ``cossim``: cos(W_dec[i], r̂), prompt-independent (its per-prompt sets are its global set);
- ``actdiff``: mean over harmful prompts of the latent's max activation minus the same over
  harmless prompts; per prompt, that prompt's max minus the harmless mean;
- ``ap``: the LA-IG score s_b(l, i) over every latent (no candidate filter);
- ``la_ig``: LA-IG restricted to the top-K0 latents per layer by cosine with r̂ ("Ours").

Global sets rank the mean over the fitting prompts; local sets rank each prompt's own score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch
import torch.nn.functional as nnf

if TYPE_CHECKING:  # SAELens takes seconds to import; model-only jobs never need it
    from sae_lens import SAE

METHODS: tuple[str, ...] = ("cossim", "actdiff", "ap", "la_ig")


@dataclass
class SelectionConfig:
    k0: int = 10  # cosine candidates per layer (la_ig)
    k_star: int = 20  # features kept


def decoder_cosines(saes: Mapping[int, SAE], r: torch.Tensor) -> torch.Tensor:
    """``[L, d_sae]`` cos(W_dec[i], r) per layer, layers in sorted order."""
    return torch.stack(
        [nnf.cosine_similarity(saes[l].W_dec.detach().float().cpu(), r.float().cpu()[None, :], dim=-1) for l in sorted(saes)]
    )


def candidate_mask(cos: torch.Tensor, k0: int) -> torch.Tensor:
    """True for the top-``k0`` latents of each layer by cosine with r̂."""
    mask = torch.zeros_like(cos, dtype=torch.bool)
    mask.scatter_(1, cos.topk(min(k0, cos.shape[1]), dim=1).indices, True)
    return mask


def top_features(score: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> list[tuple[int, int, float]]:
    """The top-``k`` ``(layer_index, latent, score)`` of ``[L, d_sae]`` over every layer."""
    if mask is not None:
        score = score.masked_fill(~mask, float("-inf"))
    k = min(k, int(torch.isfinite(score).sum()))
    vals, flat = score.flatten().topk(k)
    d = score.shape[1]
    return [(int(i) // d, int(i) % d, float(v)) for v, i in zip(vals, flat)]


@dataclass
class FeatureEvidence:
    """What the selectors read, per layer in ``layers`` order; ``local_*`` rows are ``local_ids``."""

    layers: list[int]
    cos: torch.Tensor  # [L, d]
    global_attr: torch.Tensor  # [L, d] mean LA-IG score over the fitting harmful prompts
    local_attr: torch.Tensor  # [n_local, L, d]
    max_harmful: torch.Tensor  # [L, d] mean over fitting harmful prompts of the max activation
    max_harmless: torch.Tensor  # [L, d]
    mean_harmful: torch.Tensor  # [L, d] mean over prompts of the mean activation
    mean_harmless: torch.Tensor  # [L, d]
    local_max: torch.Tensor  # [n_local, L, d]
    local_ids: list[str]


def method_scores(method: str, ev: FeatureEvidence, cfg: SelectionConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(global [L, d], local [n, L, d], candidate mask or None)`` for one method."""
    n = len(ev.local_ids)
    if method == "cossim":
        return ev.cos, ev.cos.expand(n, *ev.cos.shape), None
    if method == "actdiff":
        return ev.max_harmful - ev.max_harmless, ev.local_max - ev.max_harmless, None
    if method == "ap":
        return ev.global_attr, ev.local_attr, None
    if method == "la_ig":
        return ev.global_attr, ev.local_attr, candidate_mask(ev.cos, cfg.k0)
    raise ValueError(f"unknown feature selection method {method!r}; known: {list(METHODS)}")


def select(method: str, ev: FeatureEvidence, cfg: SelectionConfig) -> pd.DataFrame:
    """The feature table: one row per selected feature, globally and for each local prompt."""
    glob, local, mask = method_scores(method, ev, cfg)
    rows = []

    def add(scope: str, prompt_id: str | None, picked: Sequence[tuple[int, int, float]]) -> None:
        for rank, (j, i, s) in enumerate(picked, start=1):
            rows.append({
                "scope": scope, "prompt_id": prompt_id, "rank": rank, "layer": ev.layers[j], "feature": i,
                "score": s, "cos_r": float(ev.cos[j, i]),
                "mean_act_harmful": float(ev.mean_harmful[j, i]), "mean_act_harmless": float(ev.mean_harmless[j, i]),
                "max_act_harmful": float(ev.max_harmful[j, i]), "max_act_harmless": float(ev.max_harmless[j, i]),
            })

    add("global", None, top_features(glob, cfg.k_star, mask))
    for b, pid in enumerate(ev.local_ids):
        add("local", pid, top_features(local[b], cfg.k_star, mask))
    return pd.DataFrame(rows).assign(method=method)
