"""Stages of workflow/rules/guardrails.smk: dynamic SAE guardrails for unlearning and for refusal.

"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial

import pandas as pd
import torch

from refusal_atlas.core.io import write_json, write_parquet, write_table
from refusal_atlas.core.stats import bootstrap_mean
from refusal_atlas.data import prompts
from refusal_atlas.data.prompts import sample_rows
from refusal_atlas.evaluation import benchmarks
from refusal_atlas.evaluation.substring_judge import substring_refusals
from refusal_atlas.lm.activations import last_token_resid_post
from refusal_atlas.lm.generation import chat_batches, generate
from refusal_atlas.lm.interventions import DirectionAddition, Intervention
from refusal_atlas.pipeline.judging import error_set, label_rate, stage_judge
from refusal_atlas.pipeline.openers import benchmark_sample, open_model, open_saes, read_direction
from refusal_atlas.reporting import figures
from refusal_atlas.saes import corpus
from refusal_atlas.steering import clamp
from refusal_atlas.studies import guardrails
from refusal_atlas.studies.guardrails import read_passages
from refusal_atlas.studies.jailbreak import relative_drop

log = logging.getLogger("refusal_atlas")


# ---------------------------------------------------------------------------- guardrails
def _split_passages(path: str, eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A file's passages split into (select, eval) by a hash of each passage."""

    passages = read_passages(path)
    held = [prompts.assign_split(p, {"train": 1 - eval_fraction, "val": 0.0, "test": eval_fraction}, seed) == "test"
            for p in passages]
    select = [p for p, h in zip(passages, held) if not h]
    heldout = [p for p, h in zip(passages, held) if h]
    if not select or not heldout:
        raise ValueError(f"{path}: {len(passages)} passages leave an empty select or eval part")
    return select, heldout


def _sae_at(sae_dirs: Sequence[str], layer: int | None, spec: Mapping, model):
    sae_map = open_saes(sae_dirs, spec, model)
    layer = min(sae_map) if layer is None else layer
    if layer not in sae_map:
        raise ValueError(f"no SAE at layer {layer}; SAE layers: {sorted(sae_map)}")
    return sae_map, layer


def guardrail_select(*, model_dir: str, spec: Mapping, sae_dirs: Sequence[str], forget: str, retain: str, cfg: Mapping,
                     output: str, stats_out: str) -> None:
    """Latent selection (q, n) and τ of the dynamic guardrail (Muhamed et al. 2025, steps 1-3)."""

    model, tok, _ = open_model(model_dir, spec)
    sae_map, layer = _sae_at(sae_dirs, cfg["layer"], spec, model)
    sae = sae_map[layer]
    f_sel, _ = _split_passages(forget, cfg["eval_fraction"], cfg["seed"])
    r_sel, _ = _split_passages(retain, cfg["eval_fraction"], cfg["seed"])
    batches = partial(guardrails.text_batches, tok, batch_size=cfg["batch_size"], max_tokens=cfg["max_tokens"],
                      device=next(model.parameters()).device)
    stats = guardrails.feature_statistics(sae, guardrails.text_token_acts(model, tok, batches(f_sel), layer),
                                  guardrails.text_token_acts(model, tok, batches(r_sel), layer))
    rows = []
    for q in cfg["q_values"]:
        for n in cfg["n_values"]:
            chosen = guardrails.select_features(stats, q, n)
            guard = guardrails.DynamicSAEGuard(sae, layer, torch.tensor(chosen.feature.to_numpy()))
            fractions = guardrails.firing_fractions(model, tok, guard, batches(r_sel))
            tau = guardrails.calibrate_tau(fractions, cfg["tau_quantile"])
            log.info("q=%s n=%s: %d latents, tau=%.3f on %d retain passages", q, n, len(chosen), tau, len(r_sel))
            rows.append(chosen.assign(config=f"q{q:g}-n{n}", n=n, layer=layer, tau=tau,
                                      n_forget_select=len(f_sel), n_retain_select=len(r_sel)))
    write_parquet(stats.assign(layer=layer), stats_out)
    write_parquet(pd.concat(rows, ignore_index=True), output)


def _mmlu_subject(item) -> str:
    return item.id.split(":", 1)[0]  # datasets.read_mmlu's ids are subject:row


def _robust_mc_sets(model, tok, cfg: Mapping, mc_inputs: Mapping[str, str], system_prompt: str | None) -> dict:
    """``{"forget": items, "retain": items}``: the first ``max_items`` of a fixed shuffle of each
    benchmark (MMLU: of its ``retain_subjects`` where set) that the unmodified model answers
    correctly under every option ordering."""
    out = {"forget": [], "retain": []}
    mc = cfg["multiple_choice"]
    for name, path in mc_inputs.items():
        subjects = mc["retain_subjects"] if name == "mmlu" else None
        if subjects:  # SAEBench's retain side: a few MMLU subjects, not all of them
            items = [it for it in benchmark_sample(name, path, None) if _mmlu_subject(it) in subjects]
            missing = sorted(set(subjects) - {_mmlu_subject(it) for it in items})
            if missing:
                raise ValueError(f"guardrails.unlearning.multiple_choice.retain_subjects: no MMLU questions of {missing}")
            items = items[: mc["max_items"] or None]
        else:
            items = benchmark_sample(name, path, mc["max_items"])
        robust = benchmarks.robust_items(model, tok, items, batch_size=cfg["batch_size"],
                                               system_prompt=system_prompt, desc=f"{name}: every ordering")
        log.info("%s: %d of %d questions right under every ordering", name, len(robust), len(items))
        out["retain" if name == "mmlu" else "forget"] += robust
    return out


def guardrail_eval(*, model_dir: str, spec: Mapping, sae_dirs: Sequence[str], forget: str, retain: str, selection: str,
                   cfg: Mapping, boot: Mapping, caption: str, output: str, score_out: str, figure_stem: str,
                   mc_inputs: Mapping[str, str] | None = None) -> None:
    """Dynamic gate vs SAEBench's static clamp on held-out forget and retain passages, scored by
    the loss-based measure of a model too small for multiple choice: next-token top-1 accuracy
    relative to the unmodified model (and CE), and Muhamed et al.'s score. With ``mc_inputs``
    (WMDP forget sets and MMLU), also the paper's measure: accuracy over every option ordering of
    the questions the unmodified model gets right under all of them, and the score from it."""

    model, tok, system_prompt = open_model(model_dir, spec)
    chosen = pd.read_parquet(selection)
    layer = int(chosen.layer.iloc[0])
    sae = open_saes(sae_dirs, spec, model)[layer]
    _, f_eval = _split_passages(forget, cfg["eval_fraction"], cfg["seed"])
    _, r_eval = _split_passages(retain, cfg["eval_fraction"], cfg["seed"])
    batches = partial(guardrails.text_batches, tok, batch_size=cfg["batch_size"], max_tokens=cfg["max_tokens"],
                      device=next(model.parameters()).device)
    base = {"forget": guardrails.token_scores(model, tok, batches(f_eval)), "retain": guardrails.token_scores(model, tok, batches(r_eval))}
    texts = {"forget": f_eval, "retain": r_eval}
    mc = _robust_mc_sets(model, tok, cfg, mc_inputs, system_prompt) if mc_inputs else None
    rows = []
    for config, sel in chosen.groupby("config", sort=False):
        feats = torch.tensor(sel.feature.to_numpy())
        tau = float(sel.tau.iloc[0])
        observe = guardrails.DynamicSAEGuard(sae, layer, feats)
        gated = {part: float((guardrails.firing_fractions(model, tok, observe, batches(t)) > tau).mean())
                 for part, t in texts.items()}
        for c in cfg["c_values"]:
            for mode in ("dynamic", "static"):
                guard = guardrails.DynamicSAEGuard(sae, layer, feats, tau=tau, value=-float(c), static=mode == "static",
                                            edit=cfg["gate_edit"])
                row = {"config": f"{config}-c{c:g}-{mode}", "selection": config, "q": sel.q.iloc[0],
                       "n": int(sel.n.iloc[0]), "c": c, "mode": mode, "tau": tau, "layer": layer}
                for part in ("forget", "retain"):
                    scores = guardrails.token_scores(model, tok, batches(texts[part]), guardrails.bind(guard, tok))
                    ratio = relative_drop(base[part].accuracy.to_numpy(), scores.accuracy.to_numpy(), **boot)
                    # relative to the unmodified model; undefined (NaN) where that scores 0
                    row.update({f"{part}_accuracy": 1 - ratio["drop"], f"{part}_ci_low": 1 - ratio["ci_high"],
                                f"{part}_ci_high": 1 - ratio["ci_low"], f"{part}_n": ratio["n"],
                                f"{part}_abs_accuracy": float(scores.accuracy.mean()),
                                f"{part}_ce_delta": float((scores.ce - base[part].ce).mean()),
                                f"{part}_gated": gated[part] if mode == "dynamic" else 1.0})
                    if mc is not None and mc[part]:
                        acc = benchmarks.ordering_accuracy(model, tok, mc[part], intervention=guardrails.bind(guard, tok),
                                                                 batch_size=cfg["batch_size"],
                                                                 system_prompt=system_prompt, desc=part)
                        r = bootstrap_mean(acc, **boot)
                        row.update({f"{part}_mc_accuracy": r.rate, f"{part}_mc_ci_low": r.ci_low,
                                    f"{part}_mc_ci_high": r.ci_high, f"{part}_mc_n": r.n})
                log.info("%s: forget %.3f, retain %.3f", row["config"], row["forget_accuracy"], row["retain_accuracy"])
                rows.append(row)
    table = pd.DataFrame(rows)
    scores = {mode: guardrails.trade_off_score(table[table["mode"] == mode], cfg["retain_min"]) for mode in ("dynamic", "static")}
    scores["base_accuracy"] = {p: float(b.accuracy.mean()) for p, b in base.items()}
    scores["n_eval"] = {p: len(t) for p, t in texts.items()}
    scores["retain_min"] = cfg["retain_min"]
    if mc is not None and {"forget_mc_accuracy", "retain_mc_accuracy"} <= set(table.columns):
        # the paper's score, on multiple choice: the unmodified model is right on every kept question
        as_mc = table.assign(forget_accuracy=table.forget_mc_accuracy, retain_accuracy=table.retain_mc_accuracy)
        scores["multiple_choice"] = {mode: guardrails.trade_off_score(as_mc[as_mc["mode"] == mode], cfg["retain_min"])
                                     for mode in ("dynamic", "static")}
        scores["multiple_choice"]["n_robust"] = {p: len(v) for p, v in mc.items()}
    log.info("unlearning scores: %s", scores)
    write_table(table, output)
    write_json(scores, score_out)
    figures.guardrail_figure(table, scores, caption, figure_stem)


def refusal_guardrail(*, model_dir: str, spec: Mapping, sae_dirs: Sequence[str], promptset: str, features_path: str,
                      direction_summary: str, cfg: Mapping, substrings: Sequence[str], boot: Mapping, caption: str,
                      output: str, gate_out: str, figure_stem: str, own_pool: Sequence[str] = (),
                      fourlabel: Mapping | None = None) -> None:
    """The dynamic gate as a refusal guardrail: harm latents open it, refusal is then induced
    (set clamp of F*, or r added) on the prompts it opened on only; against always-on steering.

    With ``own_pool`` (promptsets, for weights the studied r was not fitted on: the untuned
    model), the weights' own behavioural refusal direction is added too (``*-add-own``). Refusal
    is the four-label judge's where ``fourlabel`` gives it (an apology that declines nothing is
    then not a refusal, and the rate is also corrected for the judge's error), else the
    substring judge's."""

    model, tok, system_prompt = open_model(model_dir, spec)
    sae_map, layer = _sae_at(sae_dirs, cfg["layer"], spec, model)
    df = pd.read_parquet(promptset)
    train = df[(df.split == cfg["fit_split"]) & df.variant.isin(["plain", "twin", "bait"])]
    kw = dict(batch_size=cfg["batch_size"], system_prompt=system_prompt)
    harmful = list(train[train.label == "harmful"].instruction)
    harmless = list(train[train.label == "harmless"].instruction)
    acts = {k: corpus.token_resid_post(model, tok, v, [layer], dtype=torch.float32, **kw)[layer]
            for k, v in (("harmful", harmful), ("harmless", harmless))}
    stats = guardrails.feature_statistics(sae_map[layer], acts["harmful"], acts["harmless"])
    chosen = guardrails.select_features(stats, cfg["q"], cfg["n"])
    guard = guardrails.DynamicSAEGuard(sae_map[layer], layer, torch.tensor(chosen.feature.to_numpy()))
    device = next(model.parameters()).device
    batches = partial(chat_batches, tok, batch_size=cfg["batch_size"], system_prompt=system_prompt,
                      device=device)
    tau = guardrails.calibrate_tau(guardrails.firing_fractions(model, tok, guard, batches(harmless)), cfg["tau_quantile"])

    test = df[(df.split == cfg["eval_split"]) & df.variant.isin(["plain", "twin", "bait"])].reset_index(drop=True)
    frac = guardrails.firing_fractions(model, tok, guard, batches(list(test.instruction)))
    test = test.assign(fraction=frac, opened=frac > tau)
    opened = frozenset(test.id[test.opened])
    log.info("gate at layer %d, %d latents, tau=%.3f: opens on %s", layer, len(chosen), tau,
             test.groupby("variant").opened.mean().round(3).to_dict())

    r, l_star = read_direction(direction_summary)
    table = pd.read_parquet(features_path)
    d_sae = {l: s.cfg.d_sae for l, s in sae_map.items()}
    fs = clamp.feature_set(table, cfg["protocol"], "global", cfg["k_star"], d_sae)
    ids = list(test.id)
    conditions = {
        "base": Intervention(),
        "guard-set": clamp.FeatureClamp(sae_map, guardrails.gated_feature_set(fs, opened, ids), mode="set",
                                           value=cfg["set_value"]),
        "guard-add": guardrails.GatedAddition(r, l_star, cfg["add_coeff"], opened),
        "always-set": clamp.FeatureClamp(sae_map, fs, mode="set", value=cfg["set_value"]),
        "always-add": DirectionAddition(r, l_star, cfg["add_coeff"]),
    }
    own = _own_direction(model, tok, system_prompt, own_pool, cfg, substrings) if own_pool else None
    if own is not None:
        coeff = cfg["own_direction"]["coeff"]
        conditions["guard-add-own"] = guardrails.GatedAddition(own[l_star], l_star, coeff, opened)
        conditions["always-add-own"] = DirectionAddition(own[l_star], l_star, coeff)
    judge, judge_name = stage_judge(substrings, fourlabel)
    errors = error_set(fourlabel)
    gens = []
    for name, intervention in conditions.items():
        out = generate(model, tok, list(test.instruction), max_new_tokens=cfg["max_new_tokens"],
                       batch_size=cfg["batch_size"], intervention=intervention, system_prompt=system_prompt,
                       desc=name, prompt_ids=ids)
        verdict = judge(list(test.instruction), out)
        gens.append(test[["id", "variant", "label", "opened"]].assign(condition=name, generation=out, verdict=verdict,
                                                                      refused=verdict == "refusal", judge=judge_name))
    gens = pd.concat(gens, ignore_index=True)
    # Added refusal is paired: each prompt under a condition minus the same prompt under base.
    base = gens[gens.condition == "base"].set_index("id").refused.astype(float)
    gens_added = gens.assign(added=gens.refused.astype(float) - gens.id.map(base))
    rows = []
    in_order = pd.Categorical(gens_added.condition, categories=list(conditions))  # the figure's bar order
    for (name, variant), g in gens_added.groupby([in_order, gens_added.variant], observed=True):
        added = bootstrap_mean(g.added.to_numpy(), **boot)
        rows.append({"condition": name, "variant": variant, "label": g.label.iloc[0],
                     **label_rate(g.verdict.to_numpy(), "refusal", boot, errors, "refusal"),
                     "gate_open_rate": float(g.opened.mean()), "added_refusal": added.rate,
                     "added_ci_low": added.ci_low, "added_ci_high": added.ci_high, "judge": judge_name})
    result = pd.DataFrame(rows)
    write_table(result, output)
    write_parquet(gens.assign(layer=layer, tau=tau), gate_out)
    figures.refusal_guardrail_figure(result, caption, figure_stem)


def _own_direction(model, tok, system_prompt: str | None, pool: Sequence[str], cfg: Mapping,
                   substrings: Sequence[str]) -> torch.Tensor | None:
    """The weights' behavioural refusal direction (guardrails.behavioural_direction) on the
    harmful ``fit_split`` prompts of ``pool``, judged by substrings on greedy answers; None, with
    a warning, when they refuse too few of them to fit one."""

    own = cfg["own_direction"]
    frames = [pd.read_parquet(p) for p in pool]
    harmful = pd.concat([f[(f.split == cfg["fit_split"]) & (f.label == "harmful")] for f in frames],
                        ignore_index=True)
    harmful = sample_rows(harmful, own["max_prompts"], own["seed"])
    prompts_ = list(harmful.instruction)
    answers = generate(model, tok, prompts_, max_new_tokens=cfg["max_new_tokens"], batch_size=cfg["batch_size"],
                       system_prompt=system_prompt, desc="own direction")
    refused = substring_refusals(answers, substrings)
    log.info("own direction: the weights refuse %d of %d harmful %s prompts", sum(refused), len(refused),
             cfg["fit_split"])
    if not own["min_refusals"] <= sum(refused) < len(refused):
        log.warning("no own direction: it needs at least %d refused and one answered prompt", own["min_refusals"])
        return None
    acts = last_token_resid_post(model, tok, prompts_, batch_size=cfg["batch_size"],
                                 system_prompt=system_prompt)
    return guardrails.behavioural_direction(acts, refused, own["min_refusals"])
