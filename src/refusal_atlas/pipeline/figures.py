"""Stages of workflow/rules/figures.smk: the organism, direction and SAE-quality figures."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from refusal_atlas.reporting import figures

log = logging.getLogger("refusal_atlas")


# ---------------------------------------------------------------------------- figures
def organism_figure(*, card: str, caption: str, stem: str) -> None:
    figures.organism_figure(json.loads(Path(card).read_text()), caption, stem)


def direction_figure(*, layers: str, summary: str, caption: str, stem: str, kl_max: float | None) -> None:
    n = json.loads(Path(summary).read_text())
    caption = (f"{caption}; r fitted on {n['n_train']['harmful']}+{n['n_train']['harmless']} train prompts, "
               f"scored on {n['n_val']['harmful']}+{n['n_val']['harmless']} val (harmful+harmless)")
    figures.direction_figure(pd.read_parquet(layers), caption, stem, kl_max)


def sae_quality_figure(*, table: str, targets: Mapping[str, float], caption: str, stem: str) -> None:
    q = pd.read_csv(table)
    lo, hi = int(q.n_tokens.min()), int(q.n_tokens.max())
    caption = f"{caption}; n = {lo if lo == hi else f'{lo}–{hi}'} tokens per layer"
    figures.sae_quality_figure(q, dict(targets), caption, stem)
