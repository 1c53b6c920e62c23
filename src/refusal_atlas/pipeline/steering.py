"""Stages of workflow/rules/steering.smk: the clamp hyperparameter search and steered generation."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
import pandas as pd

from refusal_atlas.core.io import write_json, write_parquet, write_table
from refusal_atlas.core.stats import bootstrap_rate
from refusal_atlas.data.prompts import sample_rows
from refusal_atlas.steering.conditions import Condition, parse_condition

log = logging.getLogger("refusal_atlas")


def _condition_rows(df: pd.DataFrame, cond: Condition, splits: Sequence[str], variants: Sequence[str],
                    inputs: Mapping) -> pd.DataFrame:
    rows = df[df.split.isin(splits) & df.label.isin(cond.labels) & df.variant.isin(variants)]
    if cond.scope == "local":
        table = pd.read_parquet(inputs["features"])
        ids = set(table[(table.scope == "local") & (table.protocol == cond.protocol)].prompt_id)
        rows = rows[rows.id.isin(ids)]
        if rows.empty:
            raise ValueError(f"{cond.name}: no prompt of this set has a local feature set; local conditions "
                             "run on the feature promptset only (steering.feature_promptset)")
    return rows.reset_index(drop=True)


def steer_generate(*, model_dir: str, spec: Mapping, promptset: str, method: str, inputs: Mapping, splits: Sequence[str],
                   variants: Sequence[str], shard: int, n_shards: int, max_new_tokens: int, batch_size: int,
                   cfg: Mapping, output: str) -> None:
    """One shard of a promptset generated under one condition (Yeo et al. 2025 §4.1)."""
    from refusal_atlas.lm.generation import generate
    from refusal_atlas.pipeline.openers import make_intervention, open_model
    from refusal_atlas.steering import clamp

    cond = parse_condition(method)
    df = _condition_rows(pd.read_parquet(promptset), cond, splits, variants, inputs)
    df = df[clamp.stable_shard(list(df.id), n_shards) == shard].reset_index(drop=True)
    model, tok, system_prompt = open_model(model_dir, spec)
    intervention, meta = make_intervention(cond, model, spec, inputs, cfg)
    log.info("%s shard %d/%d: %d prompts, %s", method, shard, n_shards, len(df), meta)
    gens = generate(model, tok, list(df.instruction), max_new_tokens=max_new_tokens, batch_size=batch_size,
                    intervention=intervention, system_prompt=system_prompt, desc=f"generate {method}",
                    prompt_ids=list(df.id)) if len(df) else []
    out = df.assign(method=method, generation=pd.Series(gens, dtype="string"), max_new_tokens=max_new_tokens,
                    shard=shard, condition=json.dumps(meta))
    write_parquet(out, output)


# ---------------------------------------------------------------------------- hyperparameter search
def steering_search(*, model_dir: str, spec: Mapping, promptset: str, features_path: str, sae_dirs: Sequence[str],
                    cfg: Mapping, substrings: Sequence[str], boot: Mapping, output: str, sweep_out: str,
                    fourlabel: Mapping | None = None) -> None:
    """Choose the clamp's c and K* on the validation split (the reference picked them by hand).

    Features come from the held-out protocol (fitted on the train split), so nothing of the test
    split is seen. Each (K*, c) is scored by compliance on the validation harmful prompts (the
    four-label judge's where ``fourlabel`` gives it, see ``judging.stage_judge``; else the
    substring judge's) and by the CE increase on the model's own answers to validation
    harmless prompts; the winner has the highest compliance among settings whose CE increase stays
    within ``max_ce_increase`` (a steer that breaks the model also "complies" by the substring
    judge). Ties go to the smaller |c|, then the smaller K*.
    """
    from refusal_atlas.evaluation import cross_entropy
    from refusal_atlas.lm.generation import generate
    from refusal_atlas.pipeline.judging import stage_judge
    from refusal_atlas.pipeline.openers import open_model, open_saes
    from refusal_atlas.steering import clamp

    df = pd.read_parquet(promptset)
    val = df[(df.split == cfg["split"]) & df.variant.isin(["plain", "twin"])]
    harmful = sample_rows(val[val.label == "harmful"], cfg["max_prompts"])
    harmless = sample_rows(val[val.label == "harmless"], cfg["max_prompts"])
    if harmful.empty or harmless.empty:
        raise ValueError(f"steering.search needs harmful and harmless prompts in split {cfg['split']!r}")
    model, tok, system_prompt = open_model(model_dir, spec)
    sae_map = open_saes(sae_dirs, spec, model)
    table = pd.read_parquet(features_path)
    gen = partial(generate, model, tok, max_new_tokens=cfg["max_new_tokens"], batch_size=cfg["batch_size"],
                  system_prompt=system_prompt)
    answers = gen(list(harmless.instruction), desc="search: base answers")
    ce = partial(cross_entropy.response_ce, model, tok, list(harmless.instruction), answers,
                 batch_size=cfg["batch_size"], system_prompt=system_prompt)
    base_ce = float(np.nanmean(ce()))
    label, judge_name = stage_judge(substrings, fourlabel)
    judge_name = {"substring": "substring judge: no refusal phrase", "fourlabel": "four-label judge: compliance"}[judge_name]

    def comply(instructions, gens):
        return label(instructions, gens) == "compliance"
    asked = list(harmful.instruction)
    base_complied = comply(asked, gen(asked, desc="search: base"))
    rows = [{"k_star": 0, "c": 1.0, **bootstrap_rate(np.asarray(base_complied, float), **boot).as_dict(),
             "response_ce": base_ce, "delta_ce": 0.0}]
    for k in cfg["k_values"]:
        fs = clamp.feature_set(table, "heldout", "global", k, {l: s.cfg.d_sae for l, s in sae_map.items()})
        for c in cfg["c_values"]:
            steer = clamp.FeatureClamp(sae_map, fs, mode="multiply", value=c)
            complied = comply(asked, gen(asked, intervention=steer, desc=f"search K*={k} c={c}"))
            steered_ce = float(np.nanmean(ce(intervention=steer)))
            rows.append({"k_star": k, "c": c, **bootstrap_rate(np.asarray(complied, float), **boot).as_dict(),
                         "response_ce": steered_ce, "delta_ce": steered_ce - base_ce})
            log.info("K*=%d c=%g: compliance %.3f, CE +%.3f", k, c, rows[-1]["rate"], rows[-1]["delta_ce"])
    sweep = pd.DataFrame(rows).rename(columns={"rate": "compliance"})
    sweep["feasible"] = sweep.delta_ce <= cfg["max_ce_increase"]
    cand = sweep[(sweep.k_star > 0) & sweep.feasible]
    if cand.empty:
        log.warning("no setting keeps the CE increase within %s; taking the gentlest one", cfg["max_ce_increase"])
        cand = sweep[sweep.k_star > 0].sort_values("delta_ce").head(1)
    best = cand.assign(abs_c=cand.c.abs()).sort_values(["compliance", "abs_c", "k_star"],
                                                      ascending=[False, True, True]).iloc[0]
    sweep["chosen"] = (sweep.k_star == best.k_star) & (sweep.c == best.c)
    write_table(sweep.assign(selector="la_ig", protocol="heldout", split=cfg["split"]), sweep_out)
    write_json({
        "chosen": {"c": float(best.c), "k_star": int(best.k_star)},
        "compliance": {"rate": float(best.compliance), "n": int(best.n), "ci_low": float(best.ci_low),
                       "ci_high": float(best.ci_high)},
        "delta_ce": float(best.delta_ce), "feasible": bool(best.feasible),
        "rule": f"max val compliance ({judge_name}) s.t. CE increase <= {cfg['max_ce_increase']} nats/token; "
                "ties to smaller |c| then smaller K*",
        "selector": "la_ig", "protocol": "heldout", "scope": "global", "split": cfg["split"],
        "n": {"harmful": len(harmful), "harmless": len(harmless)},
    }, output)


# ---------------------------------------------------------------------------- generations
def gather_generations(*, shards: Sequence[str], output: str) -> None:
    df = pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True)
    if df.id.duplicated().any():
        raise ValueError(f"prompt ids repeat across shards: {sorted(df.id[df.id.duplicated()])[:3]}")
    write_parquet(df, output)
