"""Stages of workflow/rules/dashboards.smk: one HTML dashboard per selected refusal feature."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from refusal_atlas.config.resolve import Clamp, read_search
from refusal_atlas.core.io import atomic_path, write_parquet, write_table
from refusal_atlas.data.prompts import sample_rows
from refusal_atlas.pipeline.openers import open_model, open_saes
from refusal_atlas.steering import clamp
from refusal_atlas.studies import dashboards

log = logging.getLogger("refusal_atlas")


# ---------------------------------------------------------------------------- dashboards
def feature_dashboards(*, model: str, sae_source: str, model_dir: str, spec: Mapping, promptset: str,
                       feature_tables: Mapping[str, str],
                       attribution_summaries: Sequence[str], sae_dirs: Sequence[str], hparams: str | None,
                       cfg: Mapping, boot: Mapping, outputs: Mapping[str, str], contrast: str | None = None) -> None:
    """A page per feature that any selector chose (dashboards.py), and the table of them all;
    with a ``contrast`` promptset, each feature's firing on its safe and unsafe prompts by type."""

    dcfg = dashboards.DashboardConfig(top_k=cfg["top_k"], max_prompts=cfg["max_prompts"],
                                      effect_prompts=cfg["effect"]["max_prompts"], batch_size=cfg["batch_size"],
                                      seed=cfg["seed"])
    feats, ranks = dashboards.selected_features({m: pd.read_parquet(p) for m, p in feature_tables.items()})
    summaries = {s["protocol"]: s for s in (json.loads(Path(p).read_text()) for p in attribution_summaries)}
    k_star, c = Clamp(**cfg["clamp"]).require(read_search(hparams), "dashboards")
    log.info("%d features selected by %d sets; clamp alone with c=%s", len(feats),
             ranks.groupby(["method", "protocol"]).ngroups, c)

    lm, tok, system_prompt = open_model(model_dir, spec)
    sae_map = open_saes(sae_dirs, spec, lm)
    ps = pd.read_parquet(promptset)
    scanned = sample_rows(ps, dcfg.max_prompts, dcfg.seed).reset_index(drop=True)
    contexts = dashboards.top_contexts(lm, tok, list(scanned.instruction), sae_map, feats, dcfg.top_k,
                                       dcfg.batch_size, system_prompt)

    profile = pd.DataFrame(columns=dashboards.CONTRAST_COLUMNS)
    if contrast:
        cps = pd.read_parquet(contrast)
        profile = dashboards.contrast_profile(lm, tok, cps[cps.split == cfg["contrast_split"]], sae_map, feats,
                                              dcfg.batch_size, system_prompt)

    effect_rows = pd.DataFrame()
    reference = None
    eval_prompts = sample_rows(ps[(ps.label == "harmful") & (ps.variant == "plain") & (ps.split == cfg["effect"]["split"])],
                           dcfg.effect_prompts, dcfg.seed)
    if len(eval_prompts):
        ref_table = pd.read_parquet(feature_tables[cfg["reference"]["selector"]])
        reference = clamp.table_rows(ref_table, cfg["reference"]["protocol"], "global", int(k_star))
        refusal_ids = summaries[cfg["reference"]["protocol"]]["refusal_token_id"]
        clamped = feats if cfg["effect"]["features"] == "all" else feats.merge(reference[["layer", "feature"]])
        effect_rows = dashboards.clamp_effects(lm, tok, list(eval_prompts.instruction), sae_map, clamped, float(c),
                                               [refusal_ids], boot, dcfg.batch_size, reference, system_prompt)
    else:
        log.warning("no clamp effect: no harmful %s prompts", cfg["effect"]["split"])
    alone = (effect_rows[effect_rows.set == "alone"].drop(columns="set") if len(effect_rows)
             else pd.DataFrame(columns=["layer", "feature"]))
    ref_row = effect_rows[effect_rows.set == "reference"].iloc[0].to_dict() if len(effect_rows) else None

    meta = {
        "model": model, "promptset": Path(promptset).stem, "sae_source": sae_source,
        "d_sae": {l: s.cfg.d_sae for l, s in sae_map.items()}, "n_sets": ranks.groupby(["method", "protocol"]).ngroups,
        "k_star": int(ranks["rank"].max()), "layer_star": next(iter(summaries.values()))["layer_star"],
        "fit_splits": {p: s["fit_split"] for p, s in summaries.items()}, "top_k": dcfg.top_k,
        "n_prompts": len(scanned), "effect_split": cfg["effect"]["split"], "confidence": boot["confidence"],
        "reference_name": f"{cfg['reference']['selector']} {cfg['reference']['protocol']} F* (K*={k_star})",
        "reference_size": 0 if reference is None else len(reference), "effect_features": cfg["effect"]["features"],
        "contrast": Path(contrast).stem if contrast else None, "contrast_split": cfg["contrast_split"],
    }
    index_rows = []
    with atomic_path(outputs["pages"], is_dir=True) as tmp:
        for rank, f in enumerate(feats.to_dict("records"), start=1):
            key = (f["layer"], f["feature"])
            eff = alone[(alone.layer == key[0]) & (alone.feature == key[1])]
            eff = eff.iloc[0].to_dict() if len(eff) else None
            mine = profile[(profile.layer == key[0]) & (profile.feature == key[1])]
            page = dashboards.render_page(
                f, ranks[(ranks.layer == key[0]) & (ranks.feature == key[1])],
                contexts[(contexts.layer == key[0]) & (contexts.feature == key[1])], scanned, eff, ref_row, meta,
                mine)
            overall = mine[mine.type == "all"]
            lexical = ({"contrast_safe_fire": overall.safe_fire.iloc[0], "contrast_unsafe_fire": overall.unsafe_fire.iloc[0]}
                       if len(overall) else {})
            name = dashboards.page_name(rank, *key)
            (tmp / name).write_text(page, encoding="utf-8")
            index_rows.append({"page": name, **f, **lexical,
                               **({k: eff[k] for k in ("delta_refusal_score", "ci_low", "ci_high", "n")} if eff else {})})
    write_parquet(contexts, outputs["contexts"])
    write_parquet(effect_rows, outputs["effects"])
    write_parquet(profile, outputs["contrast"])
    write_table(pd.DataFrame(index_rows), outputs["table"])
