"""Stages of workflow/rules/direction.smk: the refusal direction and its layer l*."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import pandas as pd
from safetensors.torch import load_file

from refusal_atlas.core.io import write_json, write_parquet, write_safetensors
from refusal_atlas.data.prompts import plain_prompts
from refusal_atlas.features import direction
from refusal_atlas.features.direction import fit_direction
from refusal_atlas.lm.modeling import autocast
from refusal_atlas.pipeline.openers import open_model

log = logging.getLogger("refusal_atlas")


def refusal_direction(*, model_dir: str, spec: Mapping, acts_path: str, index_path: str, cfg: Mapping,
                      substrings: Sequence[str], directions_out: str, layers_out: str, summary_out: str) -> None:
    acts = load_file(acts_path)["resid_post"]
    index = pd.read_parquet(index_path)
    model, tok, system_prompt = open_model(model_dir, spec)
    refusal_ids = direction.refusal_token_ids(tok, cfg["refusal_tokens"])
    dropped: list[str] = []
    if cfg["filter"] == "refusal_score":
        train = plain_prompts(index)
        train = train[train.split == "train"]
        with autocast(model, cfg["autocast_dtype"]):
            lp = direction.last_token_logprobs(model, tok, list(train.instruction), batch_size=cfg["batch_size"],
                                               system_prompt=system_prompt)
        kept = direction.filter_by_refusal(train, direction.refusal_score(lp, refusal_ids))
        dropped = sorted(set(train.id) - set(kept.id))
        log.info("refusal-score filter: %d of %d train prompts kept", len(kept), len(train))
        index = index[~index.id.isin(dropped)]
    raw, train = fit_direction(acts, index, "train")
    # A fixed random subset (all categories) bounds the cost: every candidate layer generates on it.
    val = plain_prompts(index)
    val = val[val.split == "val"].sample(frac=1.0, random_state=0)
    harmful_val = list(val[val.label == "harmful"].instruction[: cfg["max_val_prompts"]])
    harmless_val = list(val[val.label == "harmless"].instruction[: cfg["max_val_prompts"]])
    sinks = direction.massive_dims(model, tok, harmless_val[:16], cfg["sink_dims"], system_prompt)
    r = direction.zero_dims(raw, sinks)
    n_layers = r.shape[0]
    if cfg["layer"] is not None:
        if cfg["layer"] >= n_layers:
            raise ValueError(f"direction.layer {cfg['layer']} is beyond the model's {n_layers} layers")
        candidates = [cfg["layer"]]
    else:
        lo = int(cfg["min_layer_fraction"] * n_layers)
        candidates = list(range(lo, max(lo + 1, int(cfg["max_layer_fraction"] * n_layers))))
    # scoring only ranks layers; the direction itself comes from the float32 activation cache
    with autocast(model, cfg["autocast_dtype"]):
        scores = direction.score_layers(
            model, tok, r, harmful_val, harmless_val, refusal_ids, candidates=candidates, kl_max=cfg["kl_max"],
            min_induce=cfg["min_induce_score"], substrings=substrings, max_new_tokens=cfg["select_max_new_tokens"],
            batch_size=cfg["batch_size"], system_prompt=system_prompt,
        )
    chosen = cfg["layer"] if cfg["layer"] is not None else direction.choose_layer(scores)
    table = direction.scores_frame(scores, chosen)
    log.info("layer scores:\n%s", table.to_string())
    write_safetensors({"direction": r, "raw_direction": raw, "sink_dims": sinks}, directions_out,
                      metadata={"layer": str(chosen)})
    write_parquet(table, layers_out)
    write_json(
        {
            "layer": chosen,
            "selection": "fixed by config" if cfg["layer"] is not None else
            f"argmin judged harmful-val refusal under ablation (first-token score breaks ties), among layers "
            f"with harmless KL < {cfg['kl_max']} and induce score > {cfg['min_induce_score']}",
            "n_train": train.label.value_counts().reindex(["harmful", "harmless"], fill_value=0).astype(int).to_dict(),
            # the stages that refit r on the same train split drop these too
            "filter": cfg["filter"], "filtered_out_ids": dropped,
            "n_val": {"harmful": len(harmful_val), "harmless": len(harmless_val)},
            "refusal_token_ids": refusal_ids,
            "sink_dims_at_layer": sinks[chosen].tolist(),
            "chosen": table[table.layer == chosen].iloc[0].to_dict() if chosen in set(table.layer) else None,
            "directions": directions_out,
        },
        summary_out,
    )
