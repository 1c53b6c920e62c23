"""Stages of workflow/rules/features.smk: attribution per protocol, the selectors, the feature
table.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from refusal_atlas.core.io import write_json, write_parquet, write_safetensors, write_table
from refusal_atlas.core.stats import jaccard
from refusal_atlas.data.prompts import plain_prompts, sample_rows

if TYPE_CHECKING:
    from refusal_atlas.features import selection

log = logging.getLogger("refusal_atlas")


def feature_attribution(*, model_dir: str, spec: Mapping, acts_path: str, index_path: str, direction_summary: str,
                        sae_dirs: Sequence[str], layers: Sequence[int], protocol: str, cfg: Mapping,
                        output: str, summary_out: str, harmless_acts_path: str | None = None,
                        harmless_index_path: str | None = None) -> None:
    """LA-IG scores and latent statistics for one protocol (Yeo et al. 2025 §3.2; ARCHITECTURE.md).

    transductive: r, the global set and the local sets all come from the eval split (the
    reference). heldout: r and the global set from the fit split; local sets are computed on the
    eval prompts with that r, as they would be at deployment.

    A promptset without harmless prompts (a benchmark, fitted on its own prompts under
    ``evaluation.fit_on: each_promptset``) borrows them from ``harmless_*_path``, the direction
    promptset's activations (:func:`refusal_atlas.features.direction.borrow_harmless`).
    """
    import torch
    from safetensors.torch import load_file

    from refusal_atlas.features import attribution, direction, selection
    from refusal_atlas.features.direction import fit_direction
    from refusal_atlas.pipeline.openers import check_layers, open_model, open_saes

    info = json.loads(Path(direction_summary).read_text())
    layer_star = info["layer"]
    refusal_id = info["refusal_token_ids"][0]
    sinks = load_file(info["directions"])["sink_dims"]
    index = pd.read_parquet(index_path)
    acts = load_file(acts_path)["resid_post"]
    fit_split = cfg["eval_split"] if protocol == "transductive" else cfg["fit_split"]
    # r is refitted here on the prompts the direction stage kept (direction.filter)
    dropped = set(info.get("filtered_out_ids", []))
    index = index[~(index.id.isin(dropped) & (index.split == "train"))]
    if harmless_acts_path is not None:
        pool = pd.read_parquet(harmless_index_path)
        acts, index = direction.borrow_harmless(acts, index, load_file(harmless_acts_path)["resid_post"],
                                                pool[~pool.id.isin(dropped)], fit_split)
    n_borrowed = int(index["borrowed"].eq(True).sum()) if "borrowed" in index else 0
    raw, fit = fit_direction(acts, index, fit_split)
    r = direction.zero_dims(raw, sinks)[layer_star]
    plain = plain_prompts(index)
    local = plain[(plain.split == cfg["eval_split"]) & (plain.label == "harmful")]
    if protocol == "transductive":
        fit_harmful = local
    else:
        fit_harmful = sample_rows(fit[fit.label == "harmful"], cfg["max_prompts"])
    fit_harmless = sample_rows(fit[fit.label == "harmless"], cfg["max_prompts"])

    model, tok, system_prompt = open_model(model_dir, spec)
    check_layers(layers, model.config.num_hidden_layers, "sae.layers")
    device = next(model.parameters()).device
    sae_map = open_saes(sae_dirs, spec, model)
    ig_cfg = attribution.LAIGConfig.from_section(cfg)
    start = time.perf_counter()
    run = partial(attribution.la_ig, model, tok, sae_map, direction=r.to(device), refusal_id=refusal_id, cfg=ig_cfg,
                  system_prompt=system_prompt)
    attr_local = run(list(local.instruction), desc=f"LA-IG {protocol} local")
    attr_fit = attr_local if protocol == "transductive" else run(list(fit_harmful.instruction), desc="LA-IG fit")
    n_attr = len(local) + (0 if protocol == "transductive" else len(fit_harmful))
    seconds = time.perf_counter() - start
    # Harmful prompts' latent statistics come from LA-IG's clean runs; harmless ones need a pass.
    max_n, mean_n = attribution.latent_stats(model, tok, sae_map, list(fit_harmless.instruction),
                                             batch_size=cfg["stats_batch_size"], system_prompt=system_prompt)
    cos = selection.decoder_cosines(sae_map, r)
    tensors = {
        "cos": cos, "global_attr": attr_fit.scores.mean(0), "local_attr": attr_local.scores,
        "local_error_attr": attr_local.error_scores, "max_harmful": attr_fit.latent_max.mean(0),
        "max_harmless": max_n.mean(0), "mean_harmful": attr_fit.latent_mean.mean(0),
        "mean_harmless": mean_n.mean(0), "local_max": attr_local.latent_max,
        "layers": torch.tensor(sorted(layers)), "direction": r,
    }
    write_safetensors(tensors, output, metadata={"protocol": protocol, "local_ids": json.dumps(list(local.id))})
    effect = attr_fit.m_patch - attr_fit.m_clean
    write_json({
        "protocol": protocol, "fit_split": fit_split, "eval_split": cfg["eval_split"], "layer_star": layer_star,
        # r at l* as read_direction reads a direction summary: this fit's own r for the AS and add
        # conditions of a promptset fitted on its own prompts
        "directions": output, "layer": layer_star, "n_borrowed_harmless": n_borrowed,
        "refusal_token_id": refusal_id, "sae_layers": sorted(layers), "ig_steps": cfg["ig_steps"],
        "la_bz": cfg["la_bz"], "la_ig": asdict(ig_cfg),
        "n": {"fit_harmful": len(fit_harmful), "fit_harmless": len(fit_harmless), "local": len(local)},
        "metric": {"clean_mean": float(attr_fit.m_clean.mean()), "patch_mean": float(attr_fit.m_patch.mean())},
        # Each SAE layer is a cut of the residual stream: its attributions (errors included)
        # linearly account for the patch's effect as it propagates from that layer.
        "attribution_sum_by_layer": dict(zip(map(str, sorted(layers)), attr_fit.totals.mean(0).tolist())),
        "patch_effect_mean": float(effect.mean()),
        "seconds_per_prompt": seconds / max(1, n_attr),
        "device": str(device),
    }, summary_out)


def _evidence(path: str) -> selection.FeatureEvidence:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from refusal_atlas.features import selection

    with safe_open(path, "pt") as fh:
        ids = json.loads(fh.metadata()["local_ids"])
    t = load_file(path)
    return selection.FeatureEvidence(
        layers=t["layers"].tolist(), cos=t["cos"], global_attr=t["global_attr"], local_attr=t["local_attr"],
        max_harmful=t["max_harmful"], max_harmless=t["max_harmless"], mean_harmful=t["mean_harmful"],
        mean_harmless=t["mean_harmless"], local_max=t["local_max"], local_ids=ids,
    )


def select_features(*, method: str, attributions: Mapping[str, str], cfg: Mapping, output: str) -> None:
    from refusal_atlas.features import selection

    sel = selection.SelectionConfig(k0=cfg["k0"], k_star=cfg["k_star"])
    frames = [selection.select(method, _evidence(path), sel).assign(protocol=protocol)
              for protocol, path in attributions.items()]
    write_parquet(pd.concat(frames, ignore_index=True), output)


def features_table(*, files: Sequence[str], model: str, output: str, overlap_out: str) -> None:
    """Global sets of every method and protocol, and how much the sets agree (Jaccard)."""
    frames = []
    for path in files:
        df = pd.read_parquet(path)
        frames.append(df[df.scope == "global"].assign(model=model, promptset=Path(path).parent.name))
    table = pd.concat(frames, ignore_index=True).drop(columns=["prompt_id", "scope"])
    write_table(table, output)
    rows = []
    keys = sorted(set(zip(table.promptset, table.method, table.protocol)))
    for (pa, ma, ra), (pb, mb, rb) in itertools.combinations(keys, 2):
        if pa != pb or (ma != mb and ra != rb):
            continue
        a = table[(table.promptset == pa) & (table.method == ma) & (table.protocol == ra)]
        b = table[(table.promptset == pb) & (table.method == mb) & (table.protocol == rb)]
        rows.append({"model": model, "promptset": pa, "a": f"{ma}/{ra}", "b": f"{mb}/{rb}",
                     "jaccard": jaccard(set(zip(a.layer, a.feature)), set(zip(b.layer, b.feature))), "k_star": max(len(a), len(b))})
    write_table(pd.DataFrame(rows), overlap_out)
