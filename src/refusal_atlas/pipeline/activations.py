"""Stages of workflow/rules/activations.smk: last-token residual activations of a prompt set."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd

from refusal_atlas.core.io import write_parquet, write_safetensors
from refusal_atlas.lm.activations import last_token_resid_post
from refusal_atlas.pipeline.openers import open_model

log = logging.getLogger("refusal_atlas")


# ---------------------------------------------------------------------------- activations
def cache_activations(*, model_dir: str, spec: Mapping, promptset: str, batch_size: int, acts_out: str,
                      index_out: str) -> None:
    model, tok, system_prompt = open_model(model_dir, spec)
    df = pd.read_parquet(promptset)
    acts = last_token_resid_post(model, tok, list(df.instruction), batch_size=batch_size,
                                 system_prompt=system_prompt)
    meta = {"hook": "resid_post", "position": "last_prompt_token", "layers": str(acts.shape[1])}
    write_safetensors({"resid_post": acts}, acts_out, metadata=meta)
    index = df.assign(row=np.arange(len(df)))
    write_parquet(index, index_out)
