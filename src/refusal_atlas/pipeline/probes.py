"""Stages of workflow/rules/probes.smk: jailbreak responses, their mechanism, and linear probes."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

from refusal_atlas.core.io import write_parquet, write_table
from refusal_atlas.data.prompts import plain_prompts
from refusal_atlas.lm.generation import generate
from refusal_atlas.pipeline.openers import open_model, open_saes, read_direction
from refusal_atlas.reporting import figures
from refusal_atlas.saes import loading
from refusal_atlas.studies import jailbreak
from refusal_atlas.studies.probes import (
    ProbeConfig,
    Split,
    best_dense_layer,
    evaluate_probe,
    fit_probe,
    random_feature_sets,
)

log = logging.getLogger("refusal_atlas")


# ---------------------------------------------------------------------------- jailbreaks and probes
def adversarial_responses(*, model_dir: str, spec: Mapping, promptset: str, cfg: Mapping, substrings: Sequence[str],
                          output: str, fourlabel: Mapping | None = None) -> None:
    """The unsteered model's answers to each adversarial prompt and to its plain parent, judged
    (the four-label judge where ``fourlabel`` gives it, else refusal substrings): the labels of
    the jailbreak study and of the probes' adversarial slice."""
    from refusal_atlas.pipeline.judging import stage_judge
    df = pd.read_parquet(promptset)
    pairs = jailbreak.adversarial_pairs(df, allow_unpaired=bool(df.source.eq("wildjailbreak_eval").any()))
    pairs = pairs[pairs.split.isin(cfg["splits"])].reset_index(drop=True)
    rows = pd.concat([
        pairs[pairs.plain_id.notna()].drop_duplicates("plain_id").assign(id=lambda d: d.plain_id, variant="plain", instruction=lambda d: d.plain),
        pairs.assign(id=pairs.adversarial_id, variant="jailbreak", instruction=pairs.adversarial),
    ], ignore_index=True)[["id", "pair_id", "variant", "category", "split", "wrapper", "wrapper_kind", "instruction"]]
    model, tok, system_prompt = open_model(model_dir, spec)
    log.info("%d pairs: generating %d answers", len(pairs), len(rows))
    gens = generate(model, tok, list(rows.instruction), max_new_tokens=cfg["max_new_tokens"],
                    batch_size=cfg["batch_size"], system_prompt=system_prompt, desc="adversarial answers")
    judge, judge_name = stage_judge(substrings, fourlabel)
    verdict = judge(list(rows.instruction), gens)
    rows = rows.assign(generation=pd.Series(gens, dtype="string"), verdict=verdict, refused=verdict == "refusal",
                       judge=judge_name, max_new_tokens=cfg["max_new_tokens"])
    write_parquet(rows, output)


def _pair_outcomes(responses: str) -> pd.DataFrame:
    """One row per pair: both prompts, both refusal labels and the pair's outcome."""
    r = pd.read_parquet(responses)
    plain = r[r.variant == "plain"].set_index("pair_id")
    adv = r[r.variant == "jailbreak"].set_index("pair_id")
    pairs = adv[["id", "instruction", "category", "split", "wrapper", "wrapper_kind", "refused", "verdict"]].join(
        plain[["id", "instruction", "refused"]], lsuffix="_adversarial", rsuffix="_plain").reset_index()
    pairs = pairs.rename(columns={"id_adversarial": "adversarial_id", "instruction_adversarial": "adversarial",
                                  "id_plain": "plain_id", "instruction_plain": "plain"})
    if pairs.plain_id.isna().any():
        log.info("%d jailbreaks have no plain request (WildJailbreak eval): probes only", pairs.plain_id.isna().sum())
        pairs = pairs[pairs.plain_id.notna()].reset_index(drop=True)
    return pairs.assign(outcome=jailbreak.outcomes(pairs.refused_plain, pairs.refused_adversarial,
                                                   pairs.verdict == "compliance"))


def _refusal_features(features_path: str, protocol: str, k_star: int) -> pd.DataFrame:
    table = pd.read_parquet(features_path)
    rows = table[(table.scope == "global") & (table.protocol == protocol) & (table["rank"] <= k_star)]
    if rows.empty:
        raise ValueError(f"{features_path} has no global {protocol} features")
    return rows[["layer", "feature", "rank", "score"]].reset_index(drop=True)


def jailbreak_mechanism(*, model_dir: str, spec: Mapping, promptset: str, responses: str, features_path: str,
                        sae_dirs: Sequence[str], direction_summary: str, cfg: Mapping, boot: Mapping,
                        outputs: Mapping[str, str], caption: str) -> None:
    """Do jailbreaks suppress harm features or refusal features (Yeo et al. 2025 §4.3)?"""

    model, tok, system_prompt = open_model(model_dir, spec)
    sae_map = open_saes(sae_dirs, spec, model)
    refusal = _refusal_features(features_path, cfg["protocol"], cfg["k_star"])
    _, l_star = read_direction(direction_summary)
    harm_layers = cfg["harm"]["layers"] or [l for l in sae_map if l < l_star]
    if not harm_layers or any(l not in sae_map for l in harm_layers):
        raise ValueError(f"harm-feature layers {harm_layers} must be SAE layers {sorted(sae_map)} (by default those "
                         f"below the direction's layer {l_star})")
    df = pd.read_parquet(promptset)
    fit = plain_prompts(df)
    fit = fit[fit.split == cfg["fit_split"]]
    means = jailbreak.sequence_mean_latents(
        model, tok, list(fit.instruction), (fit.label != "harmful").astype(int).to_numpy(),
        {l: sae_map[l] for l in harm_layers}, batch_size=cfg["batch_size"], system_prompt=system_prompt)
    exclude = refusal.groupby("layer").feature.apply(list).to_dict()
    harm = jailbreak.harm_features(means, cfg["harm"]["k"], exclude)
    log.info("harm features (layers %s, fitted on %d %s prompts): %s", harm_layers, len(fit), cfg["fit_split"],
             list(zip(harm.layer, harm.feature)))

    pairs = _pair_outcomes(responses)
    reads = {"harm": jailbreak.as_read(harm, 0), "refusal": jailbreak.as_read(refusal, cfg["refusal_positions"])}
    kw = dict(batch_size=cfg["batch_size"], system_prompt=system_prompt)
    for side in ("plain", "adversarial"):
        # a plain request with several jailbreaks (a wrapper and a suffix) is read once
        texts = pairs[side].drop_duplicates()
        scores = jailbreak.read_features(model, tok, list(texts), sae_map, reads, desc=f"{side} reads", **kw)
        for kind, v in scores.items():
            pairs[f"{kind}_{side}"] = pairs[side].map(dict(zip(texts, v)))
    counts = pairs.outcome.value_counts().to_dict()
    log.info("pair outcomes: %s", counts)
    studied = pairs[pairs.outcome.isin(jailbreak.OUTCOMES)]
    summary = jailbreak.drop_table(studied, ["outcome"], ["harm", "refusal"], boot)
    wrappers = jailbreak.drop_table(studied, ["outcome", "wrapper_kind"], ["harm", "refusal"], boot)

    # Word occlusion on successful jailbreaks first (the drop to explain), then failed ones.
    occ = studied.sort_values(["outcome", "adversarial_id"], ascending=[False, True]).head(cfg["occlusion"]["max_prompts"])
    items = [(p.adversarial_id, word, text) for p in occ.itertuples()
             for word, text in jailbreak.occlusions(p.adversarial, p.plain, cfg["occlusion"]["max_words"])]
    effects = pd.DataFrame(items, columns=["adversarial_id", "word", "text"])
    if len(effects):
        deleted = jailbreak.read_features(model, tok, list(effects.text), sae_map,
                                          {"refusal": reads["refusal"]}, desc="word occlusion", **kw)["refusal"]
        base = occ.set_index("adversarial_id").refusal_adversarial
        effects = effects.assign(delta=deleted - base.loc[effects.adversarial_id].to_numpy())
        effects = effects.merge(occ[["adversarial_id", "outcome"]], on="adversarial_id")
    words = jailbreak.word_effects(effects if len(effects) else effects.assign(delta=[]),
                                   cfg["occlusion"]["min_count"], boot)

    meta = {"n_pairs": len(pairs), **{f"n_{k}": int(v) for k, v in counts.items()}}
    write_parquet(harm.assign(harm_layers=str(harm_layers)), outputs["harm_features"])
    write_parquet(pairs, outputs["pairs"])
    write_table(summary.assign(**meta), outputs["summary"])
    write_table(wrappers, outputs["wrappers"])
    write_table(words, outputs["words"])
    figures.mechanism_figure(summary, wrappers, words, caption, outputs["figure_stem"])


def probes(*, acts_path: str, index_path: str, responses: str, features_path: str, sae_dirs: Sequence[str],
           cfg: Mapping, boot: Mapping, outputs: Mapping[str, str], caption: str) -> None:
    """Refusal-feature, random-feature and dense probes, trained on vanilla harmful vs benign
    and tested on held-out vanilla and adversarial prompts (Yeo et al. 2025 §4.3)."""

    pcfg = ProbeConfig(c_grid=cfg["c_grid"], n_random=cfg["random_sets"], seed=cfg["seed"])
    with safe_open(acts_path, "pt") as f:
        acts = f.get_tensor("resid_post")
    index = pd.read_parquet(index_path).set_index("id")
    answers = pd.read_parquet(responses)
    adv = answers[(answers.variant == "jailbreak") & (answers.split == cfg["eval_split"])]
    vanilla = plain_prompts(index.reset_index())

    def split(rows: pd.DataFrame, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        return index.loc[rows.id, "row"].to_numpy(), labels.astype(int), list(rows.id)

    def vanilla_split(name: str):
        rows = vanilla[vanilla.split == name]
        return split(rows, (rows.label == "harmful").to_numpy())

    parts = {"train": vanilla_split(cfg["fit_split"]), "val": vanilla_split(cfg["val_split"]),
             "vanilla": vanilla_split(cfg["eval_split"]), "adversarial": split(adv, adv.refused.to_numpy())}
    log.info("probe data: %s", {k: (len(v[1]), int(v[1].sum())) for k, v in parts.items()})

    refusal = _refusal_features(features_path, cfg["protocol"], cfg["k_star"])
    sets = refusal.groupby("layer").feature.apply(lambda s: np.sort(s.to_numpy())).to_dict()
    latents = {}
    with torch.no_grad():
        for d in sae_dirs:  # last-token latents only, on the CPU: no model is loaded here
            sae = loading.load_sae(d, device="cpu", dtype="float32")
            if (layer := loading.hook_layer(sae)) in sets:
                latents[layer] = sae.encode(acts[:, layer].float()).numpy()
    if set(sets) - set(latents):
        raise ValueError(f"refusal features at layers {sorted(set(sets) - set(latents))} have no SAE")

    def feature_splits(sets: Mapping[int, np.ndarray]):
        x = np.concatenate([latents[l][:, np.asarray(f)] for l, f in sorted(sets.items())], axis=1)
        return {k: Split(x[rows], y, ids) for k, (rows, y, ids) in parts.items()}

    def run(name: str, data, **extra) -> list[dict]:
        fitted = fit_probe(data["train"], data["val"], pcfg)
        tests = {k: data[k] for k in ("vanilla", "adversarial")}
        return evaluate_probe(name, fitted, tests, boot, **extra)

    rows = run("refusal_features", feature_splits(sets), n_features=len(refusal), layer=None, random_set=None)
    train_rows = parts["train"][0]
    live = {l: (latents[l][train_rows] > 0).any(0) for l in sets}
    randoms = random_feature_sets({l: len(f) for l, f in sets.items()}, live, pcfg.n_random, pcfg.seed,
                                             exclude=sets)
    for i, rs in enumerate(randoms):
        rows += run("random_features", feature_splits(rs), n_features=len(refusal), layer=None, random_set=i)

    dense = {k: {l: Split(acts[r, l].numpy(), y, ids) for l in range(acts.shape[1])}
             for k, (r, y, ids) in parts.items()}
    layer, fitted, layer_scores = best_dense_layer(dense["train"], dense["val"], pcfg)
    log.info("dense probe: layer %d chosen on validation (accuracy %.3f), tested on the same layer", layer,
             fitted.val_accuracy)
    tests = {k: dense[k][layer] for k in ("vanilla", "adversarial")}
    rows += evaluate_probe("dense", fitted, tests, boot, n_features=acts.shape[2], layer=layer,
                                      random_set=None)
    table = pd.DataFrame(rows)
    write_parquet(table, outputs["table"])
    write_table(_probe_summary(table), outputs["summary"])
    write_table(layer_scores.assign(chosen=layer_scores.layer == layer), outputs["dense_layers"])
    figures.probe_figure(table, caption, outputs["figure_stem"])


def _probe_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per probe, slice and metric; the random sets as the mean and range of their draws."""
    fixed = table[table.probe != "random_features"].assign(sets=1, draws_min=np.nan, draws_max=np.nan)
    rand = table[table.probe == "random_features"].groupby(["probe", "slice", "metric"], as_index=False).agg(
        value=("value", "mean"), ci_low=("ci_low", "mean"), ci_high=("ci_high", "mean"), n=("n", "first"),
        positives=("positives", "first"), n_features=("n_features", "first"), sets=("random_set", "nunique"),
        draws_min=("value", "min"), draws_max=("value", "max"))
    cols = ["probe", "slice", "metric", "value", "ci_low", "ci_high", "n", "positives", "n_features", "layer", "sets",
            "draws_min", "draws_max"]
    return pd.concat([fixed, rand], ignore_index=True).reindex(columns=cols)
