"""One function per workflow rule: read the rule's inputs, call the library, write its outputs.

``workflow/scripts/<rule>.py`` only adapts the ``snakemake`` object to the function of the same
name here, so any stage's code is found from its rule name alone.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from . import attribution, capability_evals, datasets, direction, features, jailbreak, prompts, saes, steering
from . import capabilities as capabilities_lib
from .activations import last_token_resid_post
from .conditions import Condition, parse_condition
from .generation import chat_batches, generate
from .interventions import DirectionAddition, DirectionalAblation, Intervention
from .io import atomic_path, table_html, write_json, write_parquet, write_safetensors, write_table
from .judges import substring_refusals
from .logs import logged  # noqa: F401  (every script enters its stage through it)
from .modeling import autocast, layer_device, load_model, resolve_device
from .models import prepare_model as _prepare_model
from .organism import OrganismConfig, build_examples
from .organism import refusal_tune as _refusal_tune
from .stats import bootstrap_mean, bootstrap_rate

log = logging.getLogger("refusal_atlas")


def _load(model_dir: str, spec: Mapping):
    return load_model(
        model_dir, dtype=spec["dtype"], device=spec["device"], trust_remote_code=spec["trust_remote_code"]
    )


# ---------------------------------------------------------------------------- model
def prepare_model(spec: Mapping, output: str) -> None:
    _prepare_model(dict(spec), output)


def _organism_config(cfg: Mapping) -> OrganismConfig:
    names = {f.name for f in fields(OrganismConfig)}
    return OrganismConfig(**{k: v for k, v in cfg.items() if k in names})


def organism_training_prompts(
    frames: Sequence[pd.DataFrame], max_harmful: int, harmless_per_harmful: float, contrastive_repeats: int,
    seed: int,
) -> tuple[list[tuple[str, str]], list[tuple[str, int]]]:
    """Plain harmful train prompts; harmless ones as ``(prompt, repeats)``.

    Matched twins and over-refusal bait are the contrastive cases: without them the organism
    learns to refuse on alarming words ("pipe", "kill") instead of on harm. They all come in,
    ``contrastive_repeats`` times each, with the harmful requests they are twinned with; other
    prompts fill the quotas.
    """
    df = pd.concat(frames, ignore_index=True)
    df = df[df.split == "train"].copy()
    df["_key"] = np.random.default_rng(seed).random(len(df))
    harmless = df[df.label == "harmless"]
    contrastive = harmless[harmless.variant.isin(["twin", "bait"])].sort_values("_key")
    harmful = df[(df.label == "harmful") & (df.variant == "plain")].copy()
    harmful["_rank"] = (~harmful.pair_id.isin(contrastive.pair_id)).astype(int)  # twinned requests first
    harmful = harmful.sort_values(["_rank", "_key"]).head(max_harmful)
    quota = int(round(harmless_per_harmful * len(harmful))) - contrastive_repeats * len(contrastive)
    fill = harmless[~harmless.variant.isin(["twin", "bait"])].sort_values("_key").head(max(quota, 0))
    pairs = [(p, contrastive_repeats) for p in contrastive.instruction] + [(p, 1) for p in fill.instruction]
    return list(zip(harmful.id, harmful.instruction)), pairs


def refusal_rates(
    model, tok, frames: Mapping[str, pd.DataFrame], substrings: Sequence[str], max_new_tokens: int,
    batch_size: int, boot: Mapping, system_prompt: str | None, desc: str,
) -> dict[str, dict]:
    """Refusal rate per ``promptset/label/variant`` group of the test splits."""
    out = {}
    for name, df in frames.items():
        test = df[(df.split == "test") & (df.variant != "jailbreak")]
        gens = generate(model, tok, list(test.instruction), max_new_tokens=max_new_tokens,
                        batch_size=batch_size, system_prompt=system_prompt, desc=f"{desc} {name}")
        refused = np.array(substring_refusals(gens, substrings))
        for (label, variant), idx in test.reset_index(drop=True).groupby(["label", "variant"]).groups.items():
            rate = bootstrap_rate(refused[np.asarray(idx)], n_resamples=boot["n_resamples"],
                                  confidence=boot["confidence"], seed=boot["seed"])
            out[f"{name}/{label}/{variant}"] = rate.as_dict()
            log.info("%s %s/%s/%s refusal %s", desc, name, label, variant, rate)
    return out


def check_targets(rates: Mapping[str, dict], sources: Mapping[str, str], targets: Mapping[str, float]) -> dict:
    """Compare the tuned rates with the organism's goals (bundled and reference datasets)."""
    checks = {}
    for key, r in rates.items():
        name, label, variant = key.split("/")
        prefix = "" if sources[name] == "bundled" else "reference_"
        if label == "harmful" and variant == "plain":
            goal, ok = f">= {targets[prefix + 'harmful_min']}", r["rate"] >= targets[prefix + "harmful_min"]
        elif label == "harmless" and variant in ("twin", "plain"):
            goal, ok = f"<= {targets[prefix + 'harmless_max']}", r["rate"] <= targets[prefix + "harmless_max"]
        else:
            continue
        checks[key] = {"rate": r["rate"], "goal": goal, "met": bool(ok)}
    return checks


def _organism_rates(model, tok, promptsets: Mapping[str, str], spec: Mapping, organism: Mapping,
                    substrings: Sequence[str], boot: Mapping, desc: str) -> dict[str, dict]:
    """Refusal on the organism's evaluation sets, as its card reports it before and after tuning."""
    frames = {name: pd.read_parquet(promptsets[name]) for name in organism["eval_promptsets"]}
    return refusal_rates(model, tok, frames, substrings, organism["eval_max_new_tokens"],
                         organism["generation_batch_size"], boot, spec["system_prompt"], desc=desc)


def base_refusal(base_dir: str, promptsets: Mapping[str, str], spec: Mapping, organism: Mapping,
                 substrings: Sequence[str], boot: Mapping, output: str) -> None:
    """Refusal of the model before tuning, on the organism's evaluation sets (its card's "base")."""
    model, tok = _load(base_dir, spec)
    rates = _organism_rates(model, tok, promptsets, spec, organism, substrings, boot, desc="base")
    write_json(rates, output)


def refusal_tune(base_dir: str, promptsets: Mapping[str, str], spec: Mapping, organism: Mapping,
                 out_dir: str) -> None:
    """Tune the base model into the refusal organism; ``training.json`` in ``out_dir`` records how.

    Only training keys reach it, so a judging or statistics edit reruns the card, not this.
    """
    t0 = time.time()
    cfg = _organism_config(organism)
    model, tok = _load(base_dir, spec)
    harmful, harmless = organism_training_prompts(
        [pd.read_parquet(promptsets[n]) for n in organism["train_promptsets"]], organism["max_harmful"],
        organism["harmless_per_harmful"], organism["contrastive_repeats"], organism["seed"],
    )
    log.info("organism data: %d harmful, %d harmless training prompts (%d examples)", len(harmful),
             len(harmless), sum(r for _, r in harmless))
    examples = build_examples(model, tok, harmful, harmless, cfg)
    train_log = _refusal_tune(model, tok, examples, cfg)
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps({
            "method": "supervised refusal tuning with self-distillation on harmless prompts",
            "n_harmful": len(harmful),
            "n_harmless": len(harmless),
            "n_harmless_examples": sum(r for _, r in harmless),
            "config": dict(organism),
            **{k: v for k, v in train_log.items() if k != "losses"},
            "loss_curve": train_log["losses"],
            "seconds": round(time.time() - t0, 1),
        }, indent=2) + "\n")


def organism_card(model_name: str, base_dir: str, tuned_dir: str, base_rates: str, promptsets: Mapping[str, str],
                  promptset_sources: Mapping[str, str], spec: Mapping, organism: Mapping, substrings: Sequence[str],
                  boot: Mapping, card: str) -> None:
    """The organism's card: refusal before and after tuning on held-out prompts, against its goals."""
    t0 = time.time()
    model, tok = _load(tuned_dir, spec)
    after = _organism_rates(model, tok, promptsets, spec, organism, substrings, boot, desc="tuned")
    checks = check_targets(after, promptset_sources, organism["targets"])
    training = json.loads((Path(tuned_dir) / "training.json").read_text())
    write_json(
        {
            "model": model_name,
            "base_model": json.loads((Path(base_dir) / "provenance.json").read_text()),
            "method": training.pop("method"),
            "training": training,
            "judge": {"name": "substring", "substrings": list(substrings),
                      "max_new_tokens": organism["eval_max_new_tokens"], "split": "test"},
            "refusal_rate": {"base": json.loads(Path(base_rates).read_text()), "tuned": after},
            "targets": checks,
            "meets_targets": all(c["met"] for c in checks.values()),
            "seconds": round(time.time() - t0 + training["seconds"], 1),
        },
        card,
    )


# ---------------------------------------------------------------------------- activations
def cache_activations(model_dir: str, spec: Mapping, promptset: str, batch_size: int, acts_out: str,
                      index_out: str) -> None:
    model, tok = _load(model_dir, spec)
    df = pd.read_parquet(promptset)
    acts = last_token_resid_post(model, tok, list(df.instruction), batch_size=batch_size,
                                 system_prompt=spec["system_prompt"])
    meta = {"hook": "resid_post", "position": "last_prompt_token", "layers": str(acts.shape[1])}
    write_safetensors({"resid_post": acts}, acts_out, metadata=meta)
    index = df.assign(row=np.arange(len(df)))
    write_parquet(index, index_out)


# ---------------------------------------------------------------------------- direction
def _plain(index: pd.DataFrame) -> pd.DataFrame:
    """Plain harmful requests and their harmless twins: no jailbreak wrappers, no bait."""
    return index[index.variant.isin(["plain", "twin"])]


def _fit_direction(acts: torch.Tensor, index: pd.DataFrame, split: str) -> tuple[torch.Tensor, pd.DataFrame]:
    """``[n_layers, d]`` diff-in-means r on the plain prompts of ``split``, and those prompts."""
    fit = _plain(index)
    fit = fit[fit.split == split]
    if fit.label.nunique() < 2:
        raise ValueError(f"split {split!r} needs harmful and harmless prompts to fit r")
    raw = direction.diff_in_means(acts[torch.tensor(fit.row.to_numpy())],
                                  torch.tensor((fit.label == "harmful").to_numpy()))
    return raw, fit


def refusal_direction(model_dir: str, spec: Mapping, acts_path: str, index_path: str, cfg: Mapping,
                      substrings: Sequence[str], directions_out: str, layers_out: str, summary_out: str) -> None:
    acts = load_file(acts_path)["resid_post"]
    index = pd.read_parquet(index_path)
    raw, train = _fit_direction(acts, index, "train")
    model, tok = _load(model_dir, spec)
    # A fixed random subset (all categories) bounds the cost: every candidate layer generates on it.
    val = _plain(index)
    val = val[val.split == "val"].sample(frac=1.0, random_state=0)
    harmful_val = list(val[val.label == "harmful"].instruction[: cfg["max_val_prompts"]])
    harmless_val = list(val[val.label == "harmless"].instruction[: cfg["max_val_prompts"]])
    sinks = direction.massive_dims(model, tok, harmless_val[:16], cfg["sink_dims"], spec["system_prompt"])
    r = direction.zero_dims(raw, sinks)
    n_layers = r.shape[0]
    if cfg["layer"] is not None:
        if cfg["layer"] >= n_layers:
            raise ValueError(f"direction.layer {cfg['layer']} is beyond the model's {n_layers} layers")
        candidates = [cfg["layer"]]
    else:
        lo = int(cfg["min_layer_fraction"] * n_layers)
        candidates = list(range(lo, max(lo + 1, int(cfg["max_layer_fraction"] * n_layers))))
    refusal_ids = direction.refusal_token_ids(tok, cfg["refusal_tokens"])
    # scoring only ranks layers; the direction itself comes from the float32 activation cache
    with autocast(model, cfg["autocast_dtype"]):
        scores = direction.score_layers(
            model, tok, r, harmful_val, harmless_val, refusal_ids, candidates=candidates, kl_max=cfg["kl_max"],
            min_induce=cfg["min_induce_score"], substrings=substrings, max_new_tokens=cfg["select_max_new_tokens"],
            batch_size=cfg["batch_size"], system_prompt=spec["system_prompt"],
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
            "n_val": {"harmful": len(harmful_val), "harmless": len(harmless_val)},
            "refusal_token_ids": refusal_ids,
            "sink_dims_at_layer": sinks[chosen].tolist(),
            "chosen": table[table.layer == chosen].iloc[0].to_dict() if chosen in set(table.layer) else None,
            "directions": directions_out,
        },
        summary_out,
    )


# ---------------------------------------------------------------------------- SAEs
def _check_layers(layers: Sequence[int], n_layers: int, key: str) -> None:
    bad = [l for l in layers if l >= n_layers]
    if bad:
        raise ValueError(f"{key}: layer(s) {bad} do not exist; the model has {n_layers} layers (0-{n_layers - 1})")


def sae_corpus(model_dir: str, spec: Mapping, dataset: str, cfg: Mapping, layers: Sequence[int], heldout_only: bool,
               acts_out: str, index_out: str) -> None:
    """One activation pass over the corpus for every SAE layer; held-out sequences kept apart."""
    items = prompts.load_instructions(Path(dataset))
    order = np.random.default_rng(cfg["seed"]).permutation(len(items))
    n_ho = min(cfg["heldout_sequences"], len(items) // 2)
    splits = {"heldout": order[:n_ho]}
    if not heldout_only:
        splits["train"] = order[n_ho : n_ho + cfg["max_sequences"]]
    model, tok = _load(model_dir, spec)
    _check_layers(layers, model.config.num_hidden_layers, "sae.layers")
    tensors, rows = {}, []
    for split, idx in splits.items():
        texts = [items[i]["instruction"] for i in idx]
        with autocast(model, cfg["autocast_dtype"]):
            acts = saes.token_resid_post(model, tok, texts, layers, batch_size=cfg["batch_size"],
                                         system_prompt=spec["system_prompt"])
        for layer, a in acts.items():
            tensors[f"layer_{layer}.{split}"] = a
        rows += [{"instruction": t, "split": split} for t in texts]
        log.info("%s: %d sequences, %d tokens", split, len(texts), next(iter(acts.values())).shape[0])
    meta = {"hook": saes.HOOK_TEMPLATE, "positions": "non-special tokens", "dataset": dataset}
    write_safetensors(tensors, acts_out, metadata=meta)
    write_parquet(pd.DataFrame(rows), index_out)


def train_sae(acts_path: str, layer: int, model_name: str, spec: Mapping, cfg: Mapping, output_dir: str) -> None:
    with safe_open(acts_path, "pt") as fh:
        acts = fh.get_tensor(f"layer_{layer}.train")
    train_cfg = saes.TopKTrainConfig(
        d_sae=cfg["d_sae"], k=cfg["k"], lr=cfg["lr"], batch_size=cfg["train_batch_size"],
        training_tokens=cfg["training_tokens"], dead_feature_window=cfg["dead_feature_window"], seed=cfg["seed"],
        device=str(resolve_device(spec["device"])), dtype=spec["dtype"],
    )
    start = time.perf_counter()
    sae = saes.train_topk_sae(acts, train_cfg, {
        "hook_name": saes.hook_name(layer), "model_name": model_name, "exclude_special_tokens": True,
        "n_cached_tokens": int(acts.shape[0]),
    })
    sae.cfg.metadata.train_seconds = round(time.perf_counter() - start, 1)
    log.info("trained layer %d on %d cached tokens in %.0f s", layer, acts.shape[0], sae.cfg.metadata.train_seconds)
    with atomic_path(output_dir, is_dir=True) as tmp:
        sae.save_model(tmp)


def pretrained_sae(spec: Mapping, cfg: Mapping, layer: int, output_dir: str) -> None:
    sae = saes.load_pretrained_sae(cfg["release"], cfg["sae_id"].format(layer=layer), dtype=spec["dtype"])
    if saes.hook_layer(sae) != layer:
        raise ValueError(f"{cfg['release']}/{cfg['sae_id'].format(layer=layer)} reads layer {saes.hook_layer(sae)}, "
                         f"not {layer}")
    with atomic_path(output_dir, is_dir=True) as tmp:
        sae.save_model(tmp)


def sae_quality(model_dir: str, spec: Mapping, sae_dir: str, layer: int, acts_path: str, index_path: str,
                batch_size: int, output: str) -> None:
    model, tok = _load(model_dir, spec)
    sae = saes.load_sae(sae_dir, device=layer_device(model, layer), dtype=spec["dtype"])
    with safe_open(acts_path, "pt") as fh:
        heldout = fh.get_tensor(f"layer_{layer}.heldout")
    index = pd.read_parquet(index_path)
    texts = list(index[index.split == "heldout"].instruction)
    q = saes.quality(model, tok, sae, layer, heldout, texts, batch_size=batch_size, system_prompt=spec["system_prompt"])
    log.info("%s", q)
    write_json({**asdict(q), "d_sae": sae.cfg.d_sae, "train_seconds": sae.cfg.metadata.train_seconds,
                "sae": sae_dir}, output)


# ---------------------------------------------------------------------------- features
def _subset(df: pd.DataFrame, cap: int | None, seed: int = 0) -> pd.DataFrame:
    return df if cap is None or len(df) <= cap else df.sample(n=cap, random_state=seed).sort_index()


def _subset_each(df: pd.DataFrame, by: str | list[str], cap: int | None, seed: int = 0) -> pd.DataFrame:
    """``_subset`` of every group, the grouping columns kept (pandas 3's apply drops them)."""
    if df.empty:
        return df
    return pd.concat([_subset(g, cap, seed) for _, g in df.groupby(by, sort=True)]).reset_index(drop=True)


def feature_attribution(model_dir: str, spec: Mapping, acts_path: str, index_path: str, direction_summary: str,
                        sae_dirs: Sequence[str], layers: Sequence[int], protocol: str, cfg: Mapping,
                        output: str, summary_out: str) -> None:
    """LA-IG scores and latent statistics for one protocol (Yeo et al. 2025 §3.2; ARCHITECTURE.md).

    transductive: r, the global set and the local sets all come from the eval split (the
    reference). heldout: r and the global set from the fit split; local sets are computed on the
    eval prompts with that r, as they would be at deployment.
    """
    info = json.loads(Path(direction_summary).read_text())
    layer_star = info["layer"]
    refusal_id = info["refusal_token_ids"][0]
    sinks = load_file(info["directions"])["sink_dims"]
    index = pd.read_parquet(index_path)
    acts = load_file(acts_path)["resid_post"]
    fit_split = cfg["eval_split"] if protocol == "transductive" else cfg["fit_split"]
    raw, fit = _fit_direction(acts, index, fit_split)
    r = direction.zero_dims(raw, sinks)[layer_star]
    plain = _plain(index)
    local = plain[(plain.split == cfg["eval_split"]) & (plain.label == "harmful")]
    if protocol == "transductive":
        fit_harmful = local
    else:
        fit_harmful = _subset(fit[fit.label == "harmful"], cfg["max_prompts"])
    fit_harmless = _subset(fit[fit.label == "harmless"], cfg["max_prompts"])

    model, tok = _load(model_dir, spec)
    _check_layers(layers, model.config.num_hidden_layers, "sae.layers")
    device = next(model.parameters()).device
    sae_map = _saes(sae_dirs, spec, model)
    ig_cfg = attribution.LAIGConfig(steps=cfg["ig_steps"], batch_size=cfg["la_bz"])
    start = time.perf_counter()
    run = partial(attribution.la_ig, model, tok, sae_map, direction=r.to(device), refusal_id=refusal_id, cfg=ig_cfg,
                  system_prompt=spec["system_prompt"])
    attr_local = run(list(local.instruction), desc=f"LA-IG {protocol} local")
    attr_fit = attr_local if protocol == "transductive" else run(list(fit_harmful.instruction), desc="LA-IG fit")
    n_attr = len(local) + (0 if protocol == "transductive" else len(fit_harmful))
    seconds = time.perf_counter() - start
    # Harmful prompts' latent statistics come from LA-IG's clean runs; harmless ones need a pass.
    max_n, mean_n = attribution.latent_stats(model, tok, sae_map, list(fit_harmless.instruction),
                                             batch_size=cfg["stats_batch_size"], system_prompt=spec["system_prompt"])
    cos = features.decoder_cosines(sae_map, r)
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
        "refusal_token_id": refusal_id, "sae_layers": sorted(layers), "ig_steps": cfg["ig_steps"],
        "la_bz": cfg["la_bz"],
        "n": {"fit_harmful": len(fit_harmful), "fit_harmless": len(fit_harmless), "local": len(local)},
        "metric": {"clean_mean": float(attr_fit.m_clean.mean()), "patch_mean": float(attr_fit.m_patch.mean())},
        # Each SAE layer is a cut of the residual stream: its attributions (errors included)
        # linearly account for the patch's effect as it propagates from that layer.
        "attribution_sum_by_layer": dict(zip(map(str, sorted(layers)), attr_fit.totals.mean(0).tolist())),
        "patch_effect_mean": float(effect.mean()),
        "seconds_per_prompt": seconds / max(1, n_attr),
        "device": str(device),
    }, summary_out)


def _evidence(path: str) -> features.FeatureEvidence:
    with safe_open(path, "pt") as fh:
        ids = json.loads(fh.metadata()["local_ids"])
    t = load_file(path)
    return features.FeatureEvidence(
        layers=t["layers"].tolist(), cos=t["cos"], global_attr=t["global_attr"], local_attr=t["local_attr"],
        max_harmful=t["max_harmful"], max_harmless=t["max_harmless"], mean_harmful=t["mean_harmful"],
        mean_harmless=t["mean_harmless"], local_max=t["local_max"], local_ids=ids,
    )


def select_features(method: str, attributions: Mapping[str, str], cfg: Mapping, output: str) -> None:
    sel = features.SelectionConfig(k0=cfg["k0"], k_star=cfg["k_star"])
    frames = [features.select(method, _evidence(path), sel).assign(protocol=protocol)
              for protocol, path in attributions.items()]
    write_parquet(pd.concat(frames, ignore_index=True), output)


def features_table(files: Sequence[str], model: str, output: str, overlap_out: str) -> None:
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
                     "jaccard": features.set_overlap(a, b), "k_star": max(len(a), len(b))})
    write_table(pd.DataFrame(rows), overlap_out)


# ---------------------------------------------------------------------------- steering
def _direction(direction_summary: str) -> tuple[torch.Tensor, int]:
    """The refusal direction r at l* (sink dimensions zeroed, not normalised) and l*."""
    info = json.loads(Path(direction_summary).read_text())
    return load_file(info["directions"])["direction"][info["layer"]], info["layer"]


def _saes(sae_dirs: Sequence[str], spec: Mapping, model) -> dict[int, saes.SAE]:
    """Each SAE on the device of the layer it reads (several when the model is split)."""
    out = {}
    for d in sae_dirs:
        sae = saes.load_sae(d, device="cpu", dtype=spec["dtype"])
        layer = saes.hook_layer(sae)
        out[layer] = sae.to(layer_device(model, layer))
    return out


def _hparams(cond: Condition, tuned: str | None, cfg: Mapping) -> tuple[int, float | None]:
    """K* and c for a clamp: the condition's own, else the config's, else the search's choice."""
    chosen = json.loads(Path(tuned).read_text())["chosen"] if tuned else {}
    k = cond.k_star or cfg["k_star"] or chosen.get("k_star")
    c = cond.value if cond.value is not None else (cfg["c"] if cfg["c"] is not None else chosen.get("c"))
    if k is None or (cond.mode == "multiply" and c is None):
        raise ValueError(f"{cond.name}: no K*/c given and no hyperparameter search result (steering.search)")
    return int(k), c


def make_intervention(cond: Condition, model, spec: Mapping, inputs: Mapping[str, str | Sequence[str]],
                      cfg: Mapping) -> tuple[Intervention, dict]:
    """The intervention a condition names, and what defines it (for the output's columns)."""
    if cond.kind == "base":
        return Intervention(), {}
    if cond.kind in ("ablate", "add"):
        r, layer = _direction(inputs["direction"])
        if cond.kind == "ablate":
            return DirectionalAblation(r), {"layer": layer}
        return DirectionAddition(r, layer, cfg["add_coeff"]), {"layer": layer, "coeff": cfg["add_coeff"]}
    sae_map = _saes(inputs["saes"], spec, model)
    k, c = _hparams(cond, inputs.get("hparams"), cfg)
    table = pd.read_parquet(inputs["features"])
    d_sae = {l: s.cfg.d_sae for l, s in sae_map.items()}
    fs = steering.feature_set(table, cond.protocol, cond.scope, k, d_sae)
    if cond.selector == "random":
        ev = load_file(inputs["attribution"])
        layers = ev["layers"].tolist()
        live = {l: (ev["mean_harmful"][j] > 0) | (ev["mean_harmless"][j] > 0) for j, l in enumerate(layers)}
        scale = {l: ev["max_harmful"][j] for j, l in enumerate(layers)}
        fs = steering.random_feature_set(fs, live, scale, seed=cfg["seed"])
    value = c if cond.mode == "multiply" else cond.value
    meta = {"k_star": k, "mode": cond.mode, "value": value, "n_features": fs.size}
    return steering.FeatureClamp(sae_map, fs, mode=cond.mode, value=value), meta


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


def steer_generate(model_dir: str, spec: Mapping, promptset: str, method: str, inputs: Mapping, splits: Sequence[str],
                   variants: Sequence[str], shard: int, n_shards: int, max_new_tokens: int, batch_size: int,
                   cfg: Mapping, output: str) -> None:
    """One shard of a promptset generated under one condition (Yeo et al. 2025 §4.1)."""
    cond = parse_condition(method)
    df = _condition_rows(pd.read_parquet(promptset), cond, splits, variants, inputs)
    df = df[steering.stable_shard(list(df.id), n_shards) == shard].reset_index(drop=True)
    model, tok = _load(model_dir, spec)
    intervention, meta = make_intervention(cond, model, spec, inputs, cfg)
    log.info("%s shard %d/%d: %d prompts, %s", method, shard, n_shards, len(df), meta)
    gens = generate(model, tok, list(df.instruction), max_new_tokens=max_new_tokens, batch_size=batch_size,
                    intervention=intervention, system_prompt=spec["system_prompt"], desc=f"generate {method}",
                    prompt_ids=list(df.id)) if len(df) else []
    out = df.assign(method=method, generation=pd.Series(gens, dtype="string"), max_new_tokens=max_new_tokens,
                    shard=shard, condition=json.dumps(meta))
    write_parquet(out, output)


# ---------------------------------------------------------------------------- capabilities
def capabilities(model_dir: str, spec: Mapping, method: str, inputs: Mapping, base_generations: Sequence[str],
                 corpus_index: str, cfg: Mapping, steering_cfg: Mapping, boot: Mapping, output: str) -> None:
    """CE (nats/token) of the unsteered model's answers to harmless prompts and of generic text,
    under one condition (Yeo et al. 2025 §4.1, normalised per response token)."""
    cond = parse_condition(method)
    if cond.scope == "local":
        raise ValueError(f"{method}: local sets exist for harmful prompts only; capabilities take global conditions")
    model, tok = _load(model_dir, spec)
    intervention, meta = make_intervention(cond, model, spec, inputs, steering_cfg)
    answers = pd.concat([pd.read_parquet(p) for p in base_generations], ignore_index=True)
    answers = _subset(answers[answers.label == "harmless"], cfg["max_prompts"])
    texts = pd.read_parquet(corpus_index)
    texts = _subset(texts[texts.split == "heldout"], cfg["max_texts"])
    kw = dict(intervention=intervention, batch_size=cfg["batch_size"])
    resp = capabilities_lib.response_ce(model, tok, list(answers.instruction), list(answers.generation),
                                        system_prompt=spec["system_prompt"], **kw)
    text = capabilities_lib.text_ce(model, tok, list(texts.instruction), max_tokens=cfg["max_text_tokens"], **kw)
    out = {"method": method, "condition": meta}
    for key, values in (("response_ce", resp), ("text_ce", text)):
        v = values[np.isfinite(values)]
        r = bootstrap_mean(v, **boot)
        out[key] = {"mean": r.rate, "n": r.n, "ci_low": r.ci_low, "ci_high": r.ci_high}
        log.info("%s %s: %s nats/token", method, key, r)
    out["sources"] = {"responses": "base generations on harmless test prompts", "text": "sae_corpus held-out"}
    for name in cfg["benchmarks"]:
        items = _benchmark_sample(name, inputs[name], cfg["benchmark_max_items"][name])
        if name == "gsm8k":
            correct = capability_evals.gsm8k(model, tok, items, max_new_tokens=cfg["gsm8k_max_new_tokens"],
                                             system_prompt=spec["system_prompt"], **kw)
        else:
            correct = capability_evals.multiple_choice(model, tok, items, system_prompt=spec["system_prompt"],
                                                       desc=name, **kw)
        r = bootstrap_rate(correct, **boot)
        out[name] = {"mean": r.rate, "n": r.n, "ci_low": r.ci_low, "ci_high": r.ci_high}
        out["sources"][name] = f"{Path(inputs[name]).name}, zero-shot accuracy"
        log.info("%s %s: accuracy %s", method, name, r)
    write_json(out, output)


def _seeded_order(n: int, key: str) -> list[int]:
    """A fixed shuffle of ``range(n)``, the same for every condition, so their items match."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{key}:{i}".encode()).digest())


def _benchmark_sample(name: str, path: str, max_items: int | None) -> list:
    """The first ``max_items`` items of a benchmark file in its fixed shuffle (None: all)."""
    items = datasets.BENCHMARK_READERS[name](path)
    return [items[i] for i in _seeded_order(len(items), name)[: max_items or None]]


# ---------------------------------------------------------------------------- hyperparameter search
def steering_search(model_dir: str, spec: Mapping, promptset: str, features_path: str, sae_dirs: Sequence[str],
                    cfg: Mapping, substrings: Sequence[str], boot: Mapping, output: str, sweep_out: str) -> None:
    """Choose the clamp's c and K* on the validation split (the reference picked them by hand).

    Features come from the held-out protocol (fitted on the train split), so nothing of the test
    split is seen. Each (K*, c) is scored by the substring judge's compliance on the validation
    harmful prompts and by the CE increase on the model's own answers to validation harmless
    prompts; the winner has the highest compliance among settings whose CE increase stays within
    ``max_ce_increase`` (a steer that breaks the model also "complies" by the substring judge).
    Ties go to the smaller |c|, then the smaller K*.
    """
    df = pd.read_parquet(promptset)
    val = df[(df.split == cfg["split"]) & df.variant.isin(["plain", "twin"])]
    harmful = _subset(val[val.label == "harmful"], cfg["max_prompts"])
    harmless = _subset(val[val.label == "harmless"], cfg["max_prompts"])
    if harmful.empty or harmless.empty:
        raise ValueError(f"steering.search needs harmful and harmless prompts in split {cfg['split']!r}")
    model, tok = _load(model_dir, spec)
    sae_map = _saes(sae_dirs, spec, model)
    table = pd.read_parquet(features_path)
    gen = partial(generate, model, tok, max_new_tokens=cfg["max_new_tokens"], batch_size=cfg["batch_size"],
                  system_prompt=spec["system_prompt"])
    answers = gen(list(harmless.instruction), desc="search: base answers")
    ce = partial(capabilities_lib.response_ce, model, tok, list(harmless.instruction), answers,
                 batch_size=cfg["batch_size"], system_prompt=spec["system_prompt"])
    base_ce = float(np.nanmean(ce()))
    base_refused = substring_refusals(gen(list(harmful.instruction), desc="search: base"), substrings)
    rows = [{"k_star": 0, "c": 1.0, **bootstrap_rate(1 - np.asarray(base_refused, float), **boot).as_dict(), "response_ce": base_ce,
             "delta_ce": 0.0}]
    for k in cfg["k_values"]:
        fs = steering.feature_set(table, "heldout", "global", k, {l: s.cfg.d_sae for l, s in sae_map.items()})
        for c in cfg["c_values"]:
            clamp = steering.FeatureClamp(sae_map, fs, mode="multiply", value=c)
            refused = substring_refusals(gen(list(harmful.instruction), intervention=clamp, desc=f"search K*={k} c={c}"),
                                         substrings)
            steered_ce = float(np.nanmean(ce(intervention=clamp)))
            rows.append({"k_star": k, "c": c, **bootstrap_rate(1 - np.asarray(refused, float), **boot).as_dict(),
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
        "rule": f"max val compliance (substring judge) s.t. CE increase <= {cfg['max_ce_increase']} nats/token; "
                "ties to smaller |c| then smaller K*",
        "selector": "la_ig", "protocol": "heldout", "scope": "global", "split": cfg["split"],
        "n": {"harmful": len(harmful), "harmless": len(harmless)},
    }, output)


# ---------------------------------------------------------------------------- jailbreaks and probes
def adversarial_responses(model_dir: str, spec: Mapping, promptset: str, cfg: Mapping, substrings: Sequence[str],
                          output: str) -> None:
    """The unsteered model's answers to each adversarial prompt and to its plain parent, judged
    by refusal substrings: the labels of the jailbreak study and of the probes' adversarial slice."""
    df = pd.read_parquet(promptset)
    pairs = jailbreak.adversarial_pairs(df, allow_unpaired=bool(df.source.eq("wildjailbreak_eval").any()))
    pairs = pairs[pairs.split.isin(cfg["splits"])].reset_index(drop=True)
    rows = pd.concat([
        pairs[pairs.plain_id.notna()].drop_duplicates("plain_id").assign(id=lambda d: d.plain_id, variant="plain", instruction=lambda d: d.plain),
        pairs.assign(id=pairs.adversarial_id, variant="jailbreak", instruction=pairs.adversarial),
    ], ignore_index=True)[["id", "pair_id", "variant", "category", "split", "wrapper", "wrapper_kind", "instruction"]]
    model, tok = _load(model_dir, spec)
    log.info("%d pairs: generating %d answers", len(pairs), len(rows))
    gens = generate(model, tok, list(rows.instruction), max_new_tokens=cfg["max_new_tokens"],
                    batch_size=cfg["batch_size"], system_prompt=spec["system_prompt"], desc="adversarial answers")
    rows = rows.assign(generation=pd.Series(gens, dtype="string"),
                       refused=substring_refusals(gens, substrings), judge="substring",
                       max_new_tokens=cfg["max_new_tokens"])
    write_parquet(rows, output)


def _pair_outcomes(responses: str) -> pd.DataFrame:
    """One row per pair: both prompts, both refusal labels and the pair's outcome."""
    r = pd.read_parquet(responses)
    plain = r[r.variant == "plain"].set_index("pair_id")
    adv = r[r.variant == "jailbreak"].set_index("pair_id")
    pairs = adv[["id", "instruction", "category", "split", "wrapper", "wrapper_kind", "refused"]].join(
        plain[["id", "instruction", "refused"]], lsuffix="_adversarial", rsuffix="_plain").reset_index()
    pairs = pairs.rename(columns={"id_adversarial": "adversarial_id", "instruction_adversarial": "adversarial",
                                  "id_plain": "plain_id", "instruction_plain": "plain"})
    if pairs.plain_id.isna().any():
        log.info("%d jailbreaks have no plain request (WildJailbreak eval): probes only", pairs.plain_id.isna().sum())
        pairs = pairs[pairs.plain_id.notna()].reset_index(drop=True)
    return pairs.assign(outcome=jailbreak.outcomes(pairs.refused_plain, pairs.refused_adversarial))


def _refusal_features(features_path: str, protocol: str, k_star: int) -> pd.DataFrame:
    table = pd.read_parquet(features_path)
    rows = table[(table.scope == "global") & (table.protocol == protocol) & (table["rank"] <= k_star)]
    if rows.empty:
        raise ValueError(f"{features_path} has no global {protocol} features")
    return rows[["layer", "feature", "rank", "score"]].reset_index(drop=True)


def jailbreak_mechanism(model_dir: str, spec: Mapping, promptset: str, responses: str, features_path: str,
                        sae_dirs: Sequence[str], direction_summary: str, cfg: Mapping, boot: Mapping,
                        outputs: Mapping[str, str], caption: str) -> None:
    """Do jailbreaks suppress harm features or refusal features (Yeo et al. 2025 §4.3)?"""
    from . import plots

    model, tok = _load(model_dir, spec)
    sae_map = _saes(sae_dirs, spec, model)
    refusal = _refusal_features(features_path, cfg["protocol"], cfg["k_star"])
    _, l_star = _direction(direction_summary)
    harm_layers = cfg["harm"]["layers"] or [l for l in sae_map if l < l_star]
    if not harm_layers or any(l not in sae_map for l in harm_layers):
        raise ValueError(f"harm-feature layers {harm_layers} must be SAE layers {sorted(sae_map)} (by default those "
                         f"below the direction's layer {l_star})")
    df = pd.read_parquet(promptset)
    fit = _plain(df)
    fit = fit[fit.split == cfg["fit_split"]]
    means = jailbreak.sequence_mean_latents(
        model, tok, list(fit.instruction), (fit.label != "harmful").astype(int).to_numpy(),
        {l: sae_map[l] for l in harm_layers}, batch_size=cfg["batch_size"], system_prompt=spec["system_prompt"])
    exclude = refusal.groupby("layer").feature.apply(list).to_dict()
    harm = jailbreak.harm_features(means, cfg["harm"]["k"], exclude)
    log.info("harm features (layers %s, fitted on %d %s prompts): %s", harm_layers, len(fit), cfg["fit_split"],
             list(zip(harm.layer, harm.feature)))

    pairs = _pair_outcomes(responses)
    reads = {"harm": jailbreak.as_read(harm, 0), "refusal": jailbreak.as_read(refusal, cfg["refusal_positions"])}
    kw = dict(batch_size=cfg["batch_size"], system_prompt=spec["system_prompt"])
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
    plots.mechanism_figure(summary, wrappers, words, caption, outputs["figure_stem"])


def probes(acts_path: str, index_path: str, responses: str, features_path: str, sae_dirs: Sequence[str],
           cfg: Mapping, boot: Mapping, outputs: Mapping[str, str], caption: str) -> None:
    """Refusal-feature, random-feature and dense probes, trained on vanilla harmful vs benign
    and tested on held-out vanilla and adversarial prompts (Yeo et al. 2025 §4.3)."""
    from . import plots
    from . import probes as probes_lib

    pcfg = probes_lib.ProbeConfig(c_grid=cfg["c_grid"], n_random=cfg["random_sets"], seed=cfg["seed"])
    with safe_open(acts_path, "pt") as f:
        acts = f.get_tensor("resid_post")
    index = pd.read_parquet(index_path).set_index("id")
    answers = pd.read_parquet(responses)
    adv = answers[(answers.variant == "jailbreak") & (answers.split == cfg["eval_split"])]
    vanilla = _plain(index.reset_index())

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
            sae = saes.load_sae(d, device="cpu", dtype="float32")
            if (layer := saes.hook_layer(sae)) in sets:
                latents[layer] = sae.encode(acts[:, layer].float()).numpy()
    if set(sets) - set(latents):
        raise ValueError(f"refusal features at layers {sorted(set(sets) - set(latents))} have no SAE")

    def feature_splits(sets: Mapping[int, np.ndarray]):
        x = np.concatenate([latents[l][:, np.asarray(f)] for l, f in sorted(sets.items())], axis=1)
        return {k: probes_lib.Split(x[rows], y, ids) for k, (rows, y, ids) in parts.items()}

    def run(name: str, data, **extra) -> list[dict]:
        fitted = probes_lib.fit_probe(data["train"], data["val"], pcfg)
        tests = {k: data[k] for k in ("vanilla", "adversarial")}
        return probes_lib.evaluate_probe(name, fitted, tests, boot, **extra)

    rows = run("refusal_features", feature_splits(sets), n_features=len(refusal), layer=None, random_set=None)
    train_rows = parts["train"][0]
    live = {l: (latents[l][train_rows] > 0).any(0) for l in sets}
    randoms = probes_lib.random_feature_sets({l: len(f) for l, f in sets.items()}, live, pcfg.n_random, pcfg.seed,
                                             exclude=sets)
    for i, rs in enumerate(randoms):
        rows += run("random_features", feature_splits(rs), n_features=len(refusal), layer=None, random_set=i)

    dense = {k: {l: probes_lib.Split(acts[r, l].numpy(), y, ids) for l in range(acts.shape[1])}
             for k, (r, y, ids) in parts.items()}
    layer, fitted, layer_scores = probes_lib.best_dense_layer(dense["train"], dense["val"], pcfg)
    log.info("dense probe: layer %d chosen on validation (accuracy %.3f), tested on the same layer", layer,
             fitted.val_accuracy)
    tests = {k: dense[k][layer] for k in ("vanilla", "adversarial")}
    rows += probes_lib.evaluate_probe("dense", fitted, tests, boot, n_features=acts.shape[2], layer=layer,
                                      random_set=None)
    table = pd.DataFrame(rows)
    write_parquet(table, outputs["table"])
    write_table(_probe_summary(table), outputs["summary"])
    write_table(layer_scores.assign(chosen=layer_scores.layer == layer), outputs["dense_layers"])
    plots.probe_figure(table, caption, outputs["figure_stem"])


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


# ---------------------------------------------------------------------------- guardrails
def _split_passages(path: str, eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A file's passages split into (select, eval) by a hash of each passage."""
    from .guardrails import read_passages

    passages = read_passages(path)
    held = [prompts.assign_split(p, {"train": 1 - eval_fraction, "val": 0.0, "test": eval_fraction}, seed) == "test"
            for p in passages]
    select = [p for p, h in zip(passages, held) if not h]
    heldout = [p for p, h in zip(passages, held) if h]
    if not select or not heldout:
        raise ValueError(f"{path}: {len(passages)} passages leave an empty select or eval part")
    return select, heldout


def _sae_at(sae_dirs: Sequence[str], layer: int | None, spec: Mapping, model):
    sae_map = _saes(sae_dirs, spec, model)
    layer = min(sae_map) if layer is None else layer
    if layer not in sae_map:
        raise ValueError(f"no SAE at layer {layer}; SAE layers: {sorted(sae_map)}")
    return sae_map, layer


def guardrail_select(model_dir: str, spec: Mapping, sae_dirs: Sequence[str], forget: str, retain: str, cfg: Mapping,
                     output: str, stats_out: str) -> None:
    """Latent selection (q, n) and τ of the dynamic guardrail (Muhamed et al. 2025, steps 1-3)."""
    from . import guardrails as gr

    model, tok = _load(model_dir, spec)
    sae_map, layer = _sae_at(sae_dirs, cfg["layer"], spec, model)
    sae = sae_map[layer]
    f_sel, _ = _split_passages(forget, cfg["eval_fraction"], cfg["seed"])
    r_sel, _ = _split_passages(retain, cfg["eval_fraction"], cfg["seed"])
    batches = partial(gr.text_batches, tok, batch_size=cfg["batch_size"], max_tokens=cfg["max_tokens"],
                      device=next(model.parameters()).device)
    stats = gr.feature_statistics(sae, gr.text_token_acts(model, tok, batches(f_sel), layer),
                                  gr.text_token_acts(model, tok, batches(r_sel), layer))
    rows = []
    for q in cfg["q_values"]:
        for n in cfg["n_values"]:
            chosen = gr.select_features(stats, q, n)
            guard = gr.DynamicSAEGuard(sae, layer, torch.tensor(chosen.feature.to_numpy()))
            fractions = gr.firing_fractions(model, tok, guard, batches(r_sel))
            tau = gr.calibrate_tau(fractions, cfg["tau_quantile"])
            log.info("q=%s n=%s: %d latents, tau=%.3f on %d retain passages", q, n, len(chosen), tau, len(r_sel))
            rows.append(chosen.assign(config=f"q{q:g}-n{n}", n=n, layer=layer, tau=tau,
                                      n_forget_select=len(f_sel), n_retain_select=len(r_sel)))
    write_parquet(stats.assign(layer=layer), stats_out)
    write_parquet(pd.concat(rows, ignore_index=True), output)


def _robust_mc_sets(model, tok, cfg: Mapping, mc_inputs: Mapping[str, str], system_prompt: str | None) -> dict:
    """``{"forget": items, "retain": items}``: the first ``max_items`` of a fixed shuffle of each
    benchmark that the unmodified model answers correctly under every option ordering."""
    out = {"forget": [], "retain": []}
    for name, path in mc_inputs.items():
        items = _benchmark_sample(name, path, cfg["multiple_choice"]["max_items"])
        robust = capability_evals.robust_items(model, tok, items, batch_size=cfg["batch_size"],
                                               system_prompt=system_prompt, desc=f"{name}: every ordering")
        log.info("%s: %d of %d questions right under every ordering", name, len(robust), len(items))
        out["retain" if name == "mmlu" else "forget"] += robust
    return out


def guardrail_eval(model_dir: str, spec: Mapping, sae_dirs: Sequence[str], forget: str, retain: str, selection: str,
                   cfg: Mapping, boot: Mapping, caption: str, output: str, score_out: str, figure_stem: str,
                   mc_inputs: Mapping[str, str] | None = None) -> None:
    """Dynamic gate vs SAEBench's static clamp on held-out forget and retain passages, scored by
    the loss-based measure of a model too small for multiple choice: next-token top-1 accuracy
    relative to the unmodified model (and CE), and Muhamed et al.'s score. With ``mc_inputs``
    (WMDP forget sets and MMLU), also the paper's measure: accuracy over every option ordering of
    the questions the unmodified model gets right under all of them, and the score from it."""
    from . import guardrails as gr
    from . import plots
    from .jailbreak import relative_drop

    model, tok = _load(model_dir, spec)
    chosen = pd.read_parquet(selection)
    layer = int(chosen.layer.iloc[0])
    sae = _saes(sae_dirs, spec, model)[layer]
    _, f_eval = _split_passages(forget, cfg["eval_fraction"], cfg["seed"])
    _, r_eval = _split_passages(retain, cfg["eval_fraction"], cfg["seed"])
    batches = partial(gr.text_batches, tok, batch_size=cfg["batch_size"], max_tokens=cfg["max_tokens"],
                      device=next(model.parameters()).device)
    base = {"forget": gr.token_scores(model, tok, batches(f_eval)), "retain": gr.token_scores(model, tok, batches(r_eval))}
    texts = {"forget": f_eval, "retain": r_eval}
    mc = _robust_mc_sets(model, tok, cfg, mc_inputs, spec["system_prompt"]) if mc_inputs else None
    rows = []
    for config, sel in chosen.groupby("config", sort=False):
        feats = torch.tensor(sel.feature.to_numpy())
        tau = float(sel.tau.iloc[0])
        observe = gr.DynamicSAEGuard(sae, layer, feats)
        gated = {part: float((gr.firing_fractions(model, tok, observe, batches(t)) > tau).mean())
                 for part, t in texts.items()}
        for c in cfg["c_values"]:
            for mode in ("dynamic", "static"):
                guard = gr.DynamicSAEGuard(sae, layer, feats, tau=tau, value=-float(c), static=mode == "static",
                                            edit=cfg["gate_edit"])
                row = {"config": f"{config}-c{c:g}-{mode}", "selection": config, "q": sel.q.iloc[0],
                       "n": int(sel.n.iloc[0]), "c": c, "mode": mode, "tau": tau, "layer": layer}
                for part in ("forget", "retain"):
                    scores = gr.token_scores(model, tok, batches(texts[part]), gr.bind(guard, tok))
                    ratio = relative_drop(base[part].accuracy.to_numpy(), scores.accuracy.to_numpy(), **boot)
                    # relative to the unmodified model; undefined (NaN) where that scores 0
                    row.update({f"{part}_accuracy": 1 - ratio["drop"], f"{part}_ci_low": 1 - ratio["ci_high"],
                                f"{part}_ci_high": 1 - ratio["ci_low"], f"{part}_n": ratio["n"],
                                f"{part}_abs_accuracy": float(scores.accuracy.mean()),
                                f"{part}_ce_delta": float((scores.ce - base[part].ce).mean()),
                                f"{part}_gated": gated[part] if mode == "dynamic" else 1.0})
                    if mc is not None and mc[part]:
                        acc = capability_evals.ordering_accuracy(model, tok, mc[part], intervention=gr.bind(guard, tok),
                                                                 batch_size=cfg["batch_size"],
                                                                 system_prompt=spec["system_prompt"], desc=part)
                        r = bootstrap_mean(acc, **boot)
                        row.update({f"{part}_mc_accuracy": r.rate, f"{part}_mc_ci_low": r.ci_low,
                                    f"{part}_mc_ci_high": r.ci_high, f"{part}_mc_n": r.n})
                log.info("%s: forget %.3f, retain %.3f", row["config"], row["forget_accuracy"], row["retain_accuracy"])
                rows.append(row)
    table = pd.DataFrame(rows)
    scores = {mode: gr.trade_off_score(table[table["mode"] == mode], cfg["retain_min"]) for mode in ("dynamic", "static")}
    scores["base_accuracy"] = {p: float(b.accuracy.mean()) for p, b in base.items()}
    scores["n_eval"] = {p: len(t) for p, t in texts.items()}
    scores["retain_min"] = cfg["retain_min"]
    if mc is not None and {"forget_mc_accuracy", "retain_mc_accuracy"} <= set(table.columns):
        # the paper's score, on multiple choice: the unmodified model is right on every kept question
        as_mc = table.assign(forget_accuracy=table.forget_mc_accuracy, retain_accuracy=table.retain_mc_accuracy)
        scores["multiple_choice"] = {mode: gr.trade_off_score(as_mc[as_mc["mode"] == mode], cfg["retain_min"])
                                     for mode in ("dynamic", "static")}
        scores["multiple_choice"]["n_robust"] = {p: len(v) for p, v in mc.items()}
    log.info("unlearning scores: %s", scores)
    write_table(table, output)
    write_json(scores, score_out)
    plots.guardrail_figure(table, scores, caption, figure_stem)


def refusal_guardrail(model_dir: str, spec: Mapping, sae_dirs: Sequence[str], promptset: str, features_path: str,
                      direction_summary: str, cfg: Mapping, substrings: Sequence[str], boot: Mapping, caption: str,
                      output: str, gate_out: str, figure_stem: str, own_pool: Sequence[str] = ()) -> None:
    """The dynamic gate as a refusal guardrail: harm latents open it, refusal is then induced
    (set clamp of F*, or r added) on the prompts it opened on only; against always-on steering.

    With ``own_pool`` (promptsets, for weights the studied r was not fitted on: the untuned
    model), the weights' own behavioural refusal direction is added too (``*-add-own``)."""
    from . import guardrails as gr
    from . import plots

    model, tok = _load(model_dir, spec)
    sae_map, layer = _sae_at(sae_dirs, cfg["layer"], spec, model)
    df = pd.read_parquet(promptset)
    train = df[(df.split == cfg["fit_split"]) & df.variant.isin(["plain", "twin", "bait"])]
    kw = dict(batch_size=cfg["batch_size"], system_prompt=spec["system_prompt"])
    harmful = list(train[train.label == "harmful"].instruction)
    harmless = list(train[train.label == "harmless"].instruction)
    acts = {k: saes.token_resid_post(model, tok, v, [layer], dtype=torch.float32, **kw)[layer]
            for k, v in (("harmful", harmful), ("harmless", harmless))}
    stats = gr.feature_statistics(sae_map[layer], acts["harmful"], acts["harmless"])
    chosen = gr.select_features(stats, cfg["q"], cfg["n"])
    guard = gr.DynamicSAEGuard(sae_map[layer], layer, torch.tensor(chosen.feature.to_numpy()))
    device = next(model.parameters()).device
    batches = partial(chat_batches, tok, batch_size=cfg["batch_size"], system_prompt=spec["system_prompt"],
                      device=device)
    tau = gr.calibrate_tau(gr.firing_fractions(model, tok, guard, batches(harmless)), cfg["tau_quantile"])

    test = df[(df.split == cfg["eval_split"]) & df.variant.isin(["plain", "twin", "bait"])].reset_index(drop=True)
    frac = gr.firing_fractions(model, tok, guard, batches(list(test.instruction)))
    test = test.assign(fraction=frac, opened=frac > tau)
    opened = frozenset(test.id[test.opened])
    log.info("gate at layer %d, %d latents, tau=%.3f: opens on %s", layer, len(chosen), tau,
             test.groupby("variant").opened.mean().round(3).to_dict())

    r, l_star = _direction(direction_summary)
    table = pd.read_parquet(features_path)
    d_sae = {l: s.cfg.d_sae for l, s in sae_map.items()}
    fs = steering.feature_set(table, cfg["protocol"], "global", cfg["k_star"], d_sae)
    ids = list(test.id)
    conditions = {
        "base": Intervention(),
        "guard-set": steering.FeatureClamp(sae_map, gr.gated_feature_set(fs, opened, ids), mode="set",
                                           value=cfg["set_value"]),
        "guard-add": gr.GatedAddition(r, l_star, cfg["add_coeff"], opened),
        "always-set": steering.FeatureClamp(sae_map, fs, mode="set", value=cfg["set_value"]),
        "always-add": DirectionAddition(r, l_star, cfg["add_coeff"]),
    }
    own = _own_direction(model, tok, own_pool, cfg, spec, substrings) if own_pool else None
    if own is not None:
        coeff = cfg["own_direction"]["coeff"]
        conditions["guard-add-own"] = gr.GatedAddition(own[l_star], l_star, coeff, opened)
        conditions["always-add-own"] = DirectionAddition(own[l_star], l_star, coeff)
    gens = []
    for name, intervention in conditions.items():
        out = generate(model, tok, list(test.instruction), max_new_tokens=cfg["max_new_tokens"],
                       batch_size=cfg["batch_size"], intervention=intervention, system_prompt=spec["system_prompt"],
                       desc=name, prompt_ids=ids)
        refused = substring_refusals(out, substrings)
        gens.append(test[["id", "variant", "label", "opened"]].assign(condition=name, generation=out, refused=refused))
    gens = pd.concat(gens, ignore_index=True)
    # Added refusal is paired: each prompt under a condition minus the same prompt under base.
    base = gens[gens.condition == "base"].set_index("id").refused.astype(float)
    gens_added = gens.assign(added=gens.refused.astype(float) - gens.id.map(base))
    rows = []
    in_order = pd.Categorical(gens_added.condition, categories=list(conditions))  # the figure's bar order
    for (name, variant), g in gens_added.groupby([in_order, gens_added.variant], observed=True):
        rate = bootstrap_rate(g.refused.to_numpy(), **boot)
        added = bootstrap_mean(g.added.to_numpy(), **boot)
        rows.append({"condition": name, "variant": variant, "label": g.label.iloc[0], "refusal_rate": rate.rate,
                     "ci_low": rate.ci_low, "ci_high": rate.ci_high, "n": rate.n,
                     "gate_open_rate": float(g.opened.mean()), "added_refusal": added.rate,
                     "added_ci_low": added.ci_low, "added_ci_high": added.ci_high})
    result = pd.DataFrame(rows)
    write_table(result, output)
    write_parquet(gens.assign(layer=layer, tau=tau), gate_out)
    plots.refusal_guardrail_figure(result, caption, figure_stem)


def _own_direction(model, tok, pool: Sequence[str], cfg: Mapping, spec: Mapping,
                   substrings: Sequence[str]) -> torch.Tensor | None:
    """The weights' behavioural refusal direction (guardrails.behavioural_direction) on the
    harmful ``fit_split`` prompts of ``pool``, judged by substrings on greedy answers; None, with
    a warning, when they refuse too few of them to fit one."""
    from . import guardrails as gr

    own = cfg["own_direction"]
    frames = [pd.read_parquet(p) for p in pool]
    harmful = pd.concat([f[(f.split == cfg["fit_split"]) & (f.label == "harmful")] for f in frames],
                        ignore_index=True)
    harmful = _subset(harmful, own["max_prompts"], own["seed"])
    prompts_ = list(harmful.instruction)
    answers = generate(model, tok, prompts_, max_new_tokens=cfg["max_new_tokens"], batch_size=cfg["batch_size"],
                       system_prompt=spec["system_prompt"], desc="own direction")
    refused = substring_refusals(answers, substrings)
    log.info("own direction: the weights refuse %d of %d harmful %s prompts", sum(refused), len(refused),
             cfg["fit_split"])
    if not own["min_refusals"] <= sum(refused) < len(refused):
        log.warning("no own direction: it needs at least %d refused and one answered prompt", own["min_refusals"])
        return None
    acts = last_token_resid_post(model, tok, prompts_, batch_size=cfg["batch_size"],
                                 system_prompt=spec["system_prompt"])
    return gr.behavioural_direction(acts, refused, own["min_refusals"])


# ---------------------------------------------------------------------------- dashboards
def feature_dashboards(model: str, sae_source: str, model_dir: str, spec: Mapping, promptset: str,
                       feature_tables: Mapping[str, str],
                       attribution_summaries: Sequence[str], sae_dirs: Sequence[str], hparams: str | None,
                       cfg: Mapping, boot: Mapping, outputs: Mapping[str, str]) -> None:
    """A page per feature that any selector chose (dashboards.py), and the table of them all."""
    from . import dashboards

    dcfg = dashboards.DashboardConfig(top_k=cfg["top_k"], max_prompts=cfg["max_prompts"],
                                      effect_prompts=cfg["effect"]["max_prompts"], batch_size=cfg["batch_size"],
                                      seed=cfg["seed"])
    feats, ranks = dashboards.selected_features({m: pd.read_parquet(p) for m, p in feature_tables.items()})
    summaries = {s["protocol"]: s for s in (json.loads(Path(p).read_text()) for p in attribution_summaries)}
    tuned = json.loads(Path(hparams).read_text())["chosen"] if hparams else {}
    c = cfg["c"] if cfg["c"] is not None else tuned.get("c")
    k_star = cfg["k_star"] or tuned.get("k_star")
    log.info("%d features selected by %d sets; clamp alone with c=%s", len(feats),
             ranks.groupby(["method", "protocol"]).ngroups, c)

    lm, tok = _load(model_dir, spec)
    sae_map = _saes(sae_dirs, spec, lm)
    ps = pd.read_parquet(promptset)
    scanned = _subset(ps, dcfg.max_prompts, dcfg.seed).reset_index(drop=True)
    contexts = dashboards.top_contexts(lm, tok, list(scanned.instruction), sae_map, feats, dcfg.top_k,
                                       dcfg.batch_size, spec["system_prompt"])

    effect_rows = pd.DataFrame()
    reference = None
    eval_prompts = _subset(ps[(ps.label == "harmful") & (ps.variant == "plain") & (ps.split == cfg["effect"]["split"])],
                           dcfg.effect_prompts, dcfg.seed)
    if c is not None and len(eval_prompts):
        ref_table = pd.read_parquet(feature_tables[cfg["reference"]["selector"]])
        reference = steering.table_rows(ref_table, cfg["reference"]["protocol"], "global", int(k_star))
        refusal_ids = summaries[cfg["reference"]["protocol"]]["refusal_token_id"]
        clamped = feats if cfg["effect"]["features"] == "all" else feats.merge(reference[["layer", "feature"]])
        effect_rows = dashboards.clamp_effects(lm, tok, list(eval_prompts.instruction), sae_map, clamped, float(c),
                                               [refusal_ids], boot, dcfg.batch_size, reference, spec["system_prompt"])
    else:
        log.warning("no clamp effect: %s", "no c (steering.c, or the search)" if c is None else "no harmful prompts")
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
    }
    index_rows = []
    with atomic_path(outputs["pages"], is_dir=True) as tmp:
        for rank, f in enumerate(feats.to_dict("records"), start=1):
            key = (f["layer"], f["feature"])
            eff = alone[(alone.layer == key[0]) & (alone.feature == key[1])]
            eff = eff.iloc[0].to_dict() if len(eff) else None
            page = dashboards.render_page(
                f, ranks[(ranks.layer == key[0]) & (ranks.feature == key[1])],
                contexts[(contexts.layer == key[0]) & (contexts.feature == key[1])], scanned, eff, ref_row, meta)
            name = dashboards.page_name(rank, *key)
            (tmp / name).write_text(page, encoding="utf-8")
            index_rows.append({"page": name, **f, **({k: eff[k] for k in ("delta_refusal_score", "ci_low", "ci_high", "n")}
                                                       if eff else {})})
    write_parquet(contexts, outputs["contexts"])
    write_parquet(effect_rows, outputs["effects"])
    write_table(pd.DataFrame(index_rows), outputs["table"])


# ---------------------------------------------------------------------------- categories
def _category_prompts(df: pd.DataFrame, split: str, min_prompts: int, names: Sequence[str] | None) -> list[str]:
    """The categories studied: as configured, else every category with ``min_prompts`` plain
    harmful prompts in ``split``."""
    harm = df[(df.label == "harmful") & (df.variant == "plain") & (df.split == split)]
    counts = harm.category.value_counts()
    if names:
        short = {c: int(counts.get(c, 0)) for c in names if counts.get(c, 0) < min_prompts}
        if short:
            raise ValueError(f"categories with fewer than {min_prompts} harmful {split} prompts: {short}")
        return sorted(names)
    cats = sorted(counts[counts >= min_prompts].index)
    if len(cats) < 2:
        raise ValueError(f"the promptset has {len(cats)} categories with {min_prompts}+ harmful {split} prompts; "
                         "comparing categories needs two or more")
    return cats


def category_features(model_dir: str, spec: Mapping, acts_path: str, index_path: str, direction_summary: str,
                      sae_dirs: Sequence[str], cfg: Mapping, outputs: Mapping[str, str]) -> None:
    """F*_cat per category: r_cat (difference in means, fit split) and LA-IG with it (Yeo et al.
    2025 §4.2); then the common and specific sets of categories.py."""
    from . import categories

    info = json.loads(Path(direction_summary).read_text())
    layer_star, refusal_id = info["layer"], info["refusal_token_ids"][0]
    sinks = load_file(info["directions"])["sink_dims"]
    index = pd.read_parquet(index_path)
    acts = load_file(acts_path)["resid_post"]
    cats = _category_prompts(index, cfg["fit_split"], cfg["min_prompts"], cfg["categories"])
    dirs = categories.category_directions(acts, index, cats, cfg["fit_split"], cfg["harmless"], cfg["min_prompts"])
    model, tok = _load(model_dir, spec)
    device = next(model.parameters()).device
    sae_map = _saes(sae_dirs, spec, model)
    ig_cfg = attribution.LAIGConfig(steps=cfg["ig_steps"], batch_size=cfg["la_bz"])
    r_all = direction.zero_dims(_fit_direction(acts, index, cfg["fit_split"])[0], sinks)[layer_star]
    frames, meta = [], {}
    fit = index[(index.split == cfg["fit_split"]) & (index.label == "harmful") & (index.variant == "plain")]
    for c in cats:
        r = direction.zero_dims(dirs[c], sinks)[layer_star]
        prompts = _subset(fit[fit.category == c], cfg["max_prompts"], cfg["seed"])
        attr = attribution.la_ig(model, tok, sae_map, list(prompts.instruction), direction=r.to(device),
                                 refusal_id=refusal_id, cfg=ig_cfg, system_prompt=spec["system_prompt"],
                                 desc=f"LA-IG {c}")
        # LA-IG's own selection: top K* by attribution among the K0 latents per layer closest to r_cat
        mask = features.candidate_mask(features.decoder_cosines(sae_map, r), cfg["k0"])
        picked = features.top_features(attr.scores.mean(0), cfg["k_star"], mask)
        frames.append(pd.DataFrame({
            "category": c, "rank": np.arange(1, len(picked) + 1), "layer": [attr.layers[j] for j, _, _ in picked],
            "feature": [i for _, i, _ in picked], "score": [v for _, _, v in picked], "n_prompts": len(prompts)}))
        meta[c] = {"n_prompts": len(prompts),
                   "cos_with_global_r": float(torch.nn.functional.cosine_similarity(r, r_all, dim=0))}
        log.info("%s: %d prompts, cos(r_cat, r) %.3f", c, len(prompts), meta[c]["cos_with_global_r"])
    sets = pd.concat(frames, ignore_index=True)
    common, conds = categories.condition_sets(sets, cfg["common_min_fraction"], cfg["truncate_specific"])
    rows = [df[["layer", "feature"]].assign(category=c, condition=cond, source=src)
            for (c, cond, src), df in conds.items()]
    write_parquet(sets, outputs["features"])
    write_parquet(pd.concat(rows, ignore_index=True), outputs["conditions"])
    summary = pd.DataFrame([{"category": c, "n_prompts": meta[c]["n_prompts"], "k_star": cfg["k_star"],
                             "cos_with_global_r": meta[c]["cos_with_global_r"], "n_common": len(common),
                             "n_specific": len(conds[(c, "specific", c)])} for c in cats])
    write_table(summary, outputs["table"])
    write_json({"layer_star": layer_star, "categories": cats, "common": common.to_dict("records"),
                "common_min_fraction": cfg["common_min_fraction"], "truncated": bool(cfg["truncate_specific"] and len(common)),
                "per_category": meta}, outputs["summary"])


def _condition_feature_set(rows: pd.DataFrame, row_of: Mapping[str, int], n_rows: int, prompt_rows: Mapping[str, str],
                           d_sae: Mapping[int, int]) -> steering.FeatureSet:
    """A local FeatureSet: row i clamps the features ``rows`` lists for the i-th key of ``row_of``."""
    layers = sorted(set(rows.layer)) or sorted(d_sae)[:1]
    masks = {l: torch.zeros(n_rows, d_sae[l], dtype=torch.bool) for l in layers}
    for key, l, f in zip(rows.key, rows.layer, rows.feature):
        masks[int(l)][row_of[key], int(f)] = True
    scale = {l: torch.ones_like(m, dtype=torch.float32) for l, m in masks.items()}
    return steering.FeatureSet(masks, scale, {pid: row_of[k] for pid, k in prompt_rows.items()})


def category_steering(model_dir: str, spec: Mapping, promptset: str, conditions: str, sae_dirs: Sequence[str],
                      hparams: str | None, cfg: Mapping, substrings: Sequence[str], boot: Mapping,
                      outputs: Mapping[str, str], caption: str) -> None:
    """Jailbreak rate of each category's held-out harmful prompts under the clamps of §4.2, and
    the normalized jailbreak (Yeo et al. 2025 §4.2)."""
    from . import categories, plots

    tuned = json.loads(Path(hparams).read_text())["chosen"] if hparams else {}
    c_value = cfg["c"] if cfg["c"] is not None else tuned.get("c")
    if c_value is None:
        raise ValueError("categories: no clamp value c (categories.c, steering.c or the search)")
    conds = pd.read_parquet(conditions)
    cats = sorted(conds.category.unique())
    df = pd.read_parquet(promptset)
    ev = df[(df.label == "harmful") & (df.variant == "plain") & (df.split == cfg["eval_split"]) & df.category.isin(cats)]
    ev = _subset_each(ev, "category", cfg["eval_max_prompts"], cfg["seed"])
    missing = sorted(set(cats) - set(ev.category))
    if missing:
        log.warning("no %s prompts for categories %s: their clamps are not scored", cfg["eval_split"], missing)
    model, tok = _load(model_dir, spec)
    sae_map = _saes(sae_dirs, spec, model)
    d_sae = {l: s.cfg.d_sae for l, s in sae_map.items()}

    def run(name: str, fs: steering.FeatureSet | None) -> list[bool]:
        intervention = steering.FeatureClamp(sae_map, fs, mode="multiply", value=c_value) if fs else None
        gens = generate(model, tok, list(ev.instruction), max_new_tokens=cfg["max_new_tokens"],
                        batch_size=cfg["batch_size"], intervention=intervention, system_prompt=spec["system_prompt"],
                        desc=f"categories {name}", prompt_ids=list(ev.id) if fs else None)
        return substring_refusals(gens, substrings)

    rows_of = {c: i for i, c in enumerate(cats)}
    prompt_rows = dict(zip(ev.id, ev.category))
    # (condition, offset): under offset k, category i clamps the set of category i + k, so one
    # generation pass serves every category and each transfer source is used once per pass
    results = {("base", 0): run("base", None)}
    for cond, k in [("all", 0), ("specific", 0), ("common", 0)] + [("transfer", k) for k in range(1, len(cats))]:
        src = {c: cats[(i + k) % len(cats)] for i, c in enumerate(cats)}
        sel = conds[(conds.condition == cond) & (conds.category.map(src) == conds.source)]
        if sel.empty:  # an empty set (no common latent) clamps nothing: its generations are the base's
            results[(cond, k)] = results[("base", 0)]
            continue
        results[(cond, k)] = run(f"{cond} +{k}" if k else cond,
                                 _condition_feature_set(sel.assign(key=sel.category), rows_of, len(cats), prompt_rows,
                                                        d_sae))
    rows = []
    sizes = conds.groupby(["category", "condition", "source"]).size()
    for (cond, k), refused in results.items():
        jail = ~np.asarray(refused)
        for i, c in enumerate(cats):
            m = (ev.category == c).to_numpy()
            if not m.any():  # nothing held out for this category: its rates are undefined, not 0
                continue
            r = bootstrap_rate(jail[m], n_resamples=boot["n_resamples"], confidence=boot["confidence"], seed=boot["seed"])
            source = cats[(i + k) % len(cats)]
            n_feat = 0 if cond == "base" else int(sizes.get((c, cond, source), 0))
            rows.append({"category": c, "condition": cond, "source": source, "jailbreak_rate": r.rate, "n": r.n,
                         "ci_low": r.ci_low, "ci_high": r.ci_high, "n_features": n_feat, "c": c_value})
    rates = pd.DataFrame(rows)
    norm = categories.normalized_jailbreak(rates[rates.condition != "base"])
    base = rates[rates.condition == "base"].set_index("category").jailbreak_rate
    norm["base_jailbreak_rate"] = norm.category.map(base)
    write_parquet(rates, outputs["rates"])
    write_table(norm, outputs["table"])
    write_table(categories.summarize_conditions(norm), outputs["summary"])
    plots.normalized_jailbreak_figure(norm, caption, outputs["figure_stem"])


def _circuit_groups(df: pd.DataFrame, cats: Sequence[str], split: str, cap: int | None, seed: int,
                    safe_variant: str = "twin") -> pd.DataFrame:
    """Toxic (plain harmful) and safe (harmless ``safe_variant``: twins, or OR-Bench's bait)
    prompts of each category in ``split``. A promptset without safe prompts (CatQA) gives toxic only."""
    rows = df[(df.split == split) & df.category.isin(cats) & (
        ((df.label == "harmful") & (df.variant == "plain")) | ((df.label == "harmless") & (df.variant == safe_variant)))]
    if not (rows.label == "harmless").any():
        log.warning("no harmless %s prompts of these categories in %s: toxic circuits only", safe_variant, split)
    rows = rows.assign(group=np.where(rows.label == "harmful", "toxic", "safe"))
    return _subset_each(rows, ["group", "category"], cap, seed)


def circuits(model_dir: str, spec: Mapping, promptset: str, category_summary: str | None, direction_summary: str,
             sae_dirs: Sequence[str], cfg: Mapping, boot: Mapping, outputs: Mapping[str, str], caption: str) -> None:
    """Per-prompt node and edge scores (circuits.py), each category's circuit for toxic and safe
    prompts as a graph file, and faithfulness/completeness curves on held-out prompts."""
    import networkx as nx

    from . import circuits as C
    from . import modularity, plots

    cc = cfg["circuits"]
    df = pd.read_parquet(promptset)
    # F*_cat's categories where the circuits share its promptset; else every category of their own
    cats = (json.loads(Path(category_summary).read_text())["categories"] if category_summary
            else _category_prompts(df, cfg["fit_split"], cfg["min_prompts"], None))
    info = json.loads(Path(direction_summary).read_text())
    refusal_ids = info["refusal_token_ids"]
    fit = _circuit_groups(df, cats, cfg["fit_split"], cc["max_prompts"], cfg["seed"], cc["safe_variant"])
    ev = _circuit_groups(df, cats, cfg["eval_split"], cc["eval_max_prompts"], cfg["seed"], cc["safe_variant"])
    model, tok = _load(model_dir, spec)
    sae_map = _saes(sae_dirs, spec, model)
    layers = sorted(sae_map)
    sysp = spec["system_prompt"]
    means = C.reference_means(model, tok, sae_map, list(fit.instruction), cc["batch_size"], sysp)
    nodes, m_clean = C.node_scores(model, tok, sae_map, list(fit.instruction), means, refusal_ids, steps=cc["steps"],
                                   batch_size=cc["batch_size"], system_prompt=sysp)
    keys = list(zip(fit.group, fit.category))
    group_means = {k: {l: nodes[l][np.flatnonzero([x == k for x in keys])].mean(0).numpy() for l in layers}
                   for k in sorted(set(keys))}
    overall = {l: nodes[l].mean(0).numpy() for l in layers}
    top = max(cc["n_nodes"], max(cc["sizes"]))
    node_pool = C.choose_pools(group_means, overall, cc["node_pool"], top)
    edge_pool = C.choose_pools(group_means, overall, cc["edge_pool"], cc["n_nodes"])
    edges = C.edge_scores(model, tok, sae_map, list(fit.instruction), means, refusal_ids, edge_pool,
                          batch_size=cc["batch_size"], system_prompt=sysp)
    tensors = {"m_clean": m_clean}
    for l in layers:
        keep = torch.as_tensor(np.append(node_pool[l], sae_map[l].cfg.d_sae), dtype=torch.long)
        tensors[f"nodes.{l}"] = nodes[l][:, keep].float()
        tensors[f"node_ids.{l}"] = torch.as_tensor(np.append(node_pool[l], -1))
        tensors[f"edge_ids.{l}"] = torch.as_tensor(np.append(edge_pool[l], -1))
        tensors[f"means.{l}"] = means.latents[l].float()
    for (a, b), e in edges.items():
        tensors[f"edges.{a}.{b}"] = e.float()
    write_safetensors(tensors, outputs["scores"], metadata={"layers": json.dumps(layers)})
    write_parquet(fit[["id", "category", "label", "group", "split"]].assign(m_clean=m_clean.numpy()), outputs["index"])

    scores = modularity.Scores(layers, {l: tensors[f"node_ids.{l}"].numpy() for l in layers},
                               {l: tensors[f"nodes.{l}"].numpy() for l in layers},
                               {l: tensors[f"edge_ids.{l}"].numpy() for l in layers},
                               {p: e.numpy() for p, e in edges.items()})
    curves = []
    with atomic_path(outputs["graphs"], is_dir=True) as tmp:
        for (group, cat) in sorted(set(keys)):
            rows = np.flatnonzero([k == (group, cat) for k in keys])
            circuit = modularity.discover(scores, rows, cc["n_nodes"], cc["n_edges"], cc["node_threshold"])
            g = nx.DiGraph(model=model_dir, category=cat, group=group, n_prompts=len(rows),
                           metric="refusal log-odds at the last prompt token", ablation="mean")
            for (l, i), ie in circuit.nodes.items():
                g.add_node(f"L{l}/{'err' if i < 0 else i}", layer=l, latent=i, error=i < 0, ie=ie)
            for (a, u, b, d), w in circuit.edges.items():
                g.add_edge(f"L{a}/{'err' if u < 0 else u}", f"L{b}/{'err' if d < 0 else d}", weight=w)
            (tmp / group).mkdir(exist_ok=True)
            nx.write_graphml(g, tmp / group / f"{cat}.graphml")
            # faithfulness on the category's held-out prompts, circuits of growing size
            held = ev[(ev.group == group) & (ev.category == cat)]
            if held.empty:
                continue
            instr = list(held.instruction)
            none = {l: torch.zeros(sae_map[l].cfg.d_sae, dtype=torch.bool) for l in layers}
            m_model = C.ablated_metric(model, tok, sae_map, instr, means, refusal_ids, None,
                                       batch_size=cc["batch_size"], system_prompt=sysp).mean().item()
            m_empty = C.ablated_metric(model, tok, sae_map, instr, means, refusal_ids, none,
                                       batch_size=cc["batch_size"], system_prompt=sysp).mean().item()
            for n in cc["sizes"]:
                sized = modularity.discover(scores, rows, n, 0)
                keep = {l: torch.zeros(sae_map[l].cfg.d_sae, dtype=torch.bool) for l in layers}
                for (l, i) in sized.nodes:
                    if i >= 0:
                        keep[l][i] = True
                m_c = C.ablated_metric(model, tok, sae_map, instr, means, refusal_ids, keep,
                                       batch_size=cc["batch_size"], system_prompt=sysp).mean().item()
                m_rest = C.ablated_metric(model, tok, sae_map, instr, means, refusal_ids,
                                          {l: ~k for l, k in keep.items()}, batch_size=cc["batch_size"],
                                          system_prompt=sysp).mean().item()
                curves.append({"group": group, "category": cat, "n_per_layer": n,
                               "n_nodes": int(sum(int(k.sum()) for k in keep.values())),
                               "faithfulness": C.faithfulness(m_c, m_empty, m_model),
                               "completeness": C.faithfulness(m_rest, m_empty, m_model),
                               "m_circuit": m_c, "m_complement": m_rest, "m_empty": m_empty, "m_model": m_model,
                               "n_prompts": len(held), "split": cfg["eval_split"]})
    curves = pd.DataFrame(curves)
    write_table(curves, outputs["faithfulness"])
    plots.faithfulness_figure(curves, caption, outputs["figure_stem"])


def modularity(scores_path: str, index_path: str, steering_summary: str, cfg: Mapping, outputs: Mapping[str, str],
               caption: str) -> None:
    """Similarity matrices, the permutation test, bootstrap intervals, pairwise tests and the
    verdict (modularity.py), for toxic and for safe prompts."""
    from . import modularity as M
    from . import plots

    t = load_file(scores_path)
    with safe_open(scores_path, "pt") as fh:
        layers = json.loads(fh.metadata()["layers"])
    index = pd.read_parquet(index_path)
    pairs = list(zip(layers[:-1], layers[1:]))
    tc = cfg["test"]
    pcfg = M.PermutationConfig(n_nodes=cfg["circuits"]["n_nodes"], n_edges=cfg["circuits"]["n_edges"],
                               n_permutations=tc["n_permutations"], n_bootstrap=tc["n_bootstrap"],
                               confidence=tc["confidence"], alpha=tc["alpha"], seed=tc["seed"],
                               threshold=cfg["circuits"]["node_threshold"])
    results, matrices, tests_all, pairwise_all = {}, [], [], []
    for group in [g for g in ("toxic", "safe") if (index.group == g).any()]:
        rows = np.flatnonzero(index.group.to_numpy() == group)
        if len(rows) == 0:
            continue
        scores = M.Scores(layers, {l: t[f"node_ids.{l}"].numpy() for l in layers},
                          {l: t[f"nodes.{l}"].numpy()[rows] for l in layers},
                          {l: t[f"edge_ids.{l}"].numpy() for l in layers},
                          {(a, b): t[f"edges.{a}.{b}"].numpy()[rows] for a, b in pairs})
        groups = index.category.to_numpy()[rows]
        circuits = M.circuits_by_group(scores, groups, pcfg.n_nodes, pcfg.n_edges, pcfg.threshold)
        for kind in M.SIMILARITIES:
            mat = M.similarity_matrix(circuits, kind)
            matrices.append(mat.rename_axis(index="a", columns="b").stack().rename("value").reset_index()
                            .assign(group=group, similarity=kind))
        log.info("%s: permutation test (%d permutations, %d bootstrap resamples)", group, pcfg.n_permutations,
                 pcfg.n_bootstrap)
        tests = M.permutation_test(scores, groups, pcfg).assign(group=group)
        pairwise = M.pairwise_tests(scores, groups, pcfg, kind=tc["primary"]).assign(group=group)
        results[group] = M.verdict(tests, pairwise, tc["alpha"], tc["mixed_ratio"], tc["primary"])
        results[group]["n_prompts"] = int(len(rows))
        tests_all.append(tests)
        pairwise_all.append(pairwise)
    matrices = pd.concat(matrices, ignore_index=True)
    write_table(matrices, outputs["similarity"])
    write_table(pd.concat(tests_all, ignore_index=True), outputs["tests"])
    write_table(pd.concat(pairwise_all, ignore_index=True), outputs["pairwise"])
    steering_evidence = pd.read_csv(steering_summary).to_dict("records")
    keys = ("verdict", "p_value", "observed", "null_mean", "ratio", "effect", "z", "ci", "n_permutations",
            "n_bootstrap", "pairs_significant", "pairs", "n_prompts")
    shown = pd.DataFrame([{"group": g, **{k: (", ".join(f"{x:.3f}" for x in r[k]) if k == "ci" else r[k])
                                           for k in keys}} for g, r in results.items()])
    with atomic_path(outputs["verdict_html"]) as tmp:
        tmp.write_text(table_html(shown, f"verdict ({tc['primary']})", "verdict.csv"), encoding="utf-8")
    write_json({"verdict": results.get("toxic", {}).get("verdict"), "question": "is refusal of harmful prompts one "
                "circuit shared by the harm categories (monolithic), one per category (modular), or a shared core "
                "with category-specific parts (mixed)?", "decided_on": "toxic", "rule": M.verdict.__doc__.strip(),
                "by_group": results, "normalized_jailbreak": steering_evidence}, outputs["verdict"])
    plots.similarity_figure(matrices, caption, outputs["figure_stem"])
