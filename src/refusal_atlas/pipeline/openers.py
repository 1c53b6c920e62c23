"""What the stages share: a loaded model with its tokenizer and system prompt, its SAEs and
direction, the intervention a condition names, and the prompt selectors.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from sae_lens import SAE
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_atlas.config.resolve import Clamp, read_search
from refusal_atlas.data import datasets
from refusal_atlas.lm.interventions import DirectionAddition, DirectionalAblation, Intervention
from refusal_atlas.lm.modeling import layer_device, load_model
from refusal_atlas.saes import loading
from refusal_atlas.steering import clamp
from refusal_atlas.steering.conditions import Condition
from refusal_atlas.studies.circuits import Site

log = logging.getLogger("refusal_atlas")


class OpenModel(NamedTuple):
    """A prepared model as a stage uses it: weights, a left-padding tokenizer, and the system
    prompt every chat turn is formatted with (None: the template's default)."""

    model: PreTrainedModel
    tok: PreTrainedTokenizerBase
    system_prompt: str | None


def open_model(model_dir: str, spec: Mapping) -> OpenModel:
    """The prepared weights at ``model_dir``, loaded as the model's spec says (``load_params``)."""
    model, tok = load_model(
        model_dir, dtype=spec["dtype"], device=spec["device"], trust_remote_code=spec["trust_remote_code"]
    )
    return OpenModel(model, tok, spec.get("system_prompt"))


# ---------------------------------------------------------------------------- direction


# ---------------------------------------------------------------------------- SAEs
def check_layers(layers: Sequence[int], n_layers: int, key: str) -> None:
    bad = [l for l in layers if l >= n_layers]
    if bad:
        raise ValueError(f"{key}: layer(s) {bad} do not exist; the model has {n_layers} layers (0-{n_layers - 1})")


# ---------------------------------------------------------------------------- features


# ---------------------------------------------------------------------------- steering
def read_direction(direction_summary: str) -> tuple[torch.Tensor, int]:
    """The refusal direction r at l* (sink dimensions zeroed, not normalised) and l*, from the
    direction stage's summary or a feature attribution's (whose r is stored at l* alone)."""
    info = json.loads(Path(direction_summary).read_text())
    r = load_file(info["directions"])["direction"]
    return (r[info["layer"]] if r.dim() == 2 else r), info["layer"]


def open_saes(sae_dirs: Sequence[str], spec: Mapping, model) -> dict[int, SAE]:
    """Each SAE on the device of the layer it reads (several when the model is split)."""
    out = {}
    for d in sae_dirs:
        sae = loading.load_sae(d, device="cpu", dtype=spec["dtype"])
        layer = loading.hook_layer(sae)
        out[layer] = sae.to(layer_device(model, layer))
    return out


def open_submodule_saes(sae_dirs: Sequence[str], spec: Mapping, model) -> dict:
    """``{Site(layer, submodule): SAE}`` for the circuits' attention and MLP SAEs."""
    out = {}
    for d in sae_dirs:
        sae = loading.load_sae(d, device="cpu", dtype=spec["dtype"])
        layer, submodule = loading.site_of(sae)
        out[Site(layer, submodule)] = sae.to(layer_device(model, layer))
    return out


def make_intervention(cond: Condition, model, spec: Mapping, inputs: Mapping[str, str | Sequence[str]],
                      cfg: Mapping) -> tuple[Intervention, dict]:
    """The intervention a condition names, and what defines it (for the output's columns)."""
    if cond.kind == "base":
        return Intervention(), {}
    if cond.kind in ("ablate", "add"):
        r, layer = read_direction(inputs["direction"])
        if cond.kind == "ablate":
            return DirectionalAblation(r), {"layer": layer}
        return DirectionAddition(r, layer, cfg["add_coeff"]), {"layer": layer, "coeff": cfg["add_coeff"]}
    sae_map = open_saes(inputs["saes"], spec, model)
    k, c = Clamp(**cfg["clamp"]).require(read_search(inputs.get("hparams")), cond.name)
    table = pd.read_parquet(inputs["features"])
    d_sae = {l: s.cfg.d_sae for l, s in sae_map.items()}
    fs = clamp.feature_set(table, cond.protocol, cond.scope, k, d_sae)
    if cond.selector == "random":
        ev = load_file(inputs["attribution"])
        layers = ev["layers"].tolist()
        live = {l: (ev["mean_harmful"][j] > 0) | (ev["mean_harmless"][j] > 0) for j, l in enumerate(layers)}
        scale = {l: ev["max_harmful"][j] for j, l in enumerate(layers)}
        fs = clamp.random_feature_set(fs, live, scale, seed=cfg["seed"])
    value = c if cond.mode == "multiply" else cond.value
    meta = {"k_star": k, "mode": cond.mode, "value": value, "n_features": fs.size}
    return clamp.FeatureClamp(sae_map, fs, mode=cond.mode, value=value), meta


def seeded_order(n: int, key: str) -> list[int]:
    """A fixed shuffle of ``range(n)``, the same for every condition, so their items match."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{key}:{i}".encode()).digest())


def benchmark_sample(name: str, path: str, max_items: int | None) -> list:
    """The first ``max_items`` items of a benchmark file in its fixed shuffle (None: all)."""
    items = datasets.BENCHMARK_READERS[name](path)
    return [items[i] for i in seeded_order(len(items), name)[: max_items or None]]
