"""Stages of workflow/rules/direction.smk: the refusal direction and its layer l*."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from safetensors.torch import load_file

from refusal_atlas.core.io import write_json, write_parquet, write_safetensors
from refusal_atlas.data.prompts import plain_prompts
from refusal_atlas.features import direction
from refusal_atlas.features.direction import fit_direction
from refusal_atlas.lm.activations import final_positions_resid_post
from refusal_atlas.lm.modeling import autocast, post_instruction_length
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
    # Arditi et al.'s candidates: r at each post-instruction position (offsets from the prompt's
    # end); the activation cache holds the last one, so the others are read here, once
    offsets = [-1]
    raws = raw[None]
    if cfg["positions"] == "post_instruction":
        n_pos = post_instruction_length(tok, system_prompt)
        by_pos = final_positions_resid_post(model, tok, list(train.instruction), n_pos, batch_size=cfg["batch_size"],
                                            system_prompt=system_prompt, desc="post-instruction activations")
        raws = direction.diff_in_means(by_pos, torch.tensor((train.label == "harmful").to_numpy()))
        offsets = list(range(-n_pos, 0))
    # A fixed random subset (all categories) bounds the cost: every candidate layer generates on it.
    val = plain_prompts(index)
    val = val[val.split == "val"].sample(frac=1.0, random_state=0)
    harmful_val = list(val[val.label == "harmful"].instruction[: cfg["max_val_prompts"]])
    harmless_val = list(val[val.label == "harmless"].instruction[: cfg["max_val_prompts"]])
    sinks = direction.massive_dims(model, tok, harmless_val[:16], cfg["sink_dims"], system_prompt)
    rs = torch.stack([direction.zero_dims(r, sinks) for r in raws])
    n_layers = rs.shape[1]
    if cfg["layer"] is not None:
        if cfg["layer"] >= n_layers:
            raise ValueError(f"direction.layer {cfg['layer']} is beyond the model's {n_layers} layers")
        candidates = [cfg["layer"]]
    else:
        lo = int(cfg["min_layer_fraction"] * n_layers)
        candidates = list(range(lo, max(lo + 1, int(cfg["max_layer_fraction"] * n_layers))))
    # scoring only ranks candidates; the directions themselves come from float32 activations
    scores = []
    with autocast(model, cfg["autocast_dtype"]):
        base_harmless = direction.last_token_logprobs(model, tok, harmless_val, batch_size=cfg["batch_size"],
                                                      system_prompt=system_prompt)
        for offset, r in zip(offsets, rs):
            scores += [dataclasses.replace(sc, position=offset) for sc in direction.score_layers(
                model, tok, r, harmful_val, harmless_val, refusal_ids, candidates=candidates, kl_max=cfg["kl_max"],
                min_induce=cfg["min_induce_score"], substrings=substrings,
                max_new_tokens=cfg["select_max_new_tokens"], batch_size=cfg["batch_size"], system_prompt=system_prompt,
                base_harmless=base_harmless,
            )]
    # a fixed layer is taken as given; with several positions, the rule still picks one among them
    best = direction.choose(scores, eligible_only=cfg["layer"] is None)
    chosen, position = best.layer, best.position
    table = direction.scores_frame(scores, chosen, position)
    log.info("layer scores:\n%s", table.to_string())
    at = offsets.index(position)
    write_safetensors({"direction": rs[at], "raw_direction": raws[at], "sink_dims": sinks}, directions_out,
                      metadata={"layer": str(chosen), "position": str(position)})
    write_parquet(table, layers_out)
    write_json(
        {
            "layer": chosen,
            "positions": cfg["positions"],
            # counted from the prompt's end; -1 is the last token, which the activation cache holds
            "position": position,
            "selection": "fixed by config" if cfg["layer"] is not None else
            f"argmin judged harmful-val refusal under ablation (first-token score breaks ties), among "
            f"{'post-instruction positions and ' if len(offsets) > 1 else ''}layers with harmless KL < "
            f"{cfg['kl_max']} and induce score > {cfg['min_induce_score']}",
            "n_train": train.label.value_counts().reindex(["harmful", "harmless"], fill_value=0).astype(int).to_dict(),
            # the stages that refit r on the same train split drop these too
            "filter": cfg["filter"], "filtered_out_ids": dropped,
            "n_val": {"harmful": len(harmful_val), "harmless": len(harmless_val)},
            "refusal_token_ids": refusal_ids,
            "sink_dims_at_layer": sinks[chosen].tolist(),
            "chosen": table[table.chosen].iloc[0].to_dict() if table.chosen.any() else None,
            "directions": directions_out,
        },
        summary_out,
    )
