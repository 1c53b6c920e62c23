"""One function per workflow rule: read the rule's inputs, call the library, write its outputs.

``workflow/scripts/<rule>.py`` only adapts the ``snakemake`` object to the function of the same
name here, so any stage's code is found from its rule name alone.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from . import datasets, direction, prompts
from .activations import last_token_resid_post
from .generation import generate
from .interventions import DirectionalAblation, Intervention
from .io import atomic_path, write_csv, write_json, write_parquet, write_safetensors
from .judges import substring_refusals
from .modeling import load_model
from .models import prepare_model as _prepare_model
from .organism import OrganismConfig, build_examples, refusal_tune as _refusal_tune
from .stats import bootstrap_rate

log = logging.getLogger("refusal_atlas")


@contextmanager
def logged(log_path: str, threads: int = 1) -> Iterator[None]:
    """Send logging and stderr (tqdm bars) to the rule's log file; use the rule's threads."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", buffering=1) as fh:
        old_err = sys.stderr
        sys.stderr = fh
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        torch.set_num_threads(max(1, threads))
        try:
            yield
        except Exception:
            log.exception("stage failed")
            raise
        finally:
            root.removeHandler(handler)
            sys.stderr = old_err


def _load(model_dir: str, spec: Mapping):
    return load_model(
        model_dir, dtype=spec["dtype"], device=spec["device"], trust_remote_code=spec["trust_remote_code"]
    )


# ---------------------------------------------------------------------------- data
def download_dataset(manifest: str, key: str, dest: str, mirror: str | None, timeout: float) -> None:
    entries = datasets.load_manifest(manifest)
    if key not in entries:
        raise datasets.DatasetError(f"{key!r} is not in the dataset manifest {manifest}")
    datasets.download(entries[key], dest, mirror=mirror, timeout=timeout)


def build_promptsets(spec: Mapping, inputs: Mapping[str, str], output: str) -> None:
    if spec["source"] == "bundled":
        df = prompts.bundled_promptset(Path(inputs["pairs"]).parent, spec["split_fractions"], spec["seed"])
    else:
        df = prompts.refusal_direction_promptset(inputs, spec["max_per_split"], spec["seed"])
    counts = df.groupby(["split", "label", "variant"]).size()
    log.info("prompt set counts:\n%s", counts.to_string())
    write_parquet(df, output)


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


def _eval_frames(promptsets: Mapping[str, str], names: Sequence[str]) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(promptsets[name]) for name in names}


def base_refusal(base_dir: str, promptsets: Mapping[str, str], spec: Mapping, organism: Mapping,
                 substrings: Sequence[str], boot: Mapping, output: str) -> None:
    """Refusal of the model before tuning, on the organism's evaluation sets (its card's "base")."""
    model, tok = _load(base_dir, spec)
    rates = refusal_rates(model, tok, _eval_frames(promptsets, organism["eval_promptsets"]), substrings,
                          organism["eval_max_new_tokens"], organism["generation_batch_size"], boot,
                          spec["system_prompt"], desc="base")
    write_json(rates, output)


def refusal_tune(
    model_name: str, base_dir: str, base_rates: str, promptsets: Mapping[str, str],
    promptset_sources: Mapping[str, str], spec: Mapping, organism: Mapping, substrings: Sequence[str],
    boot: Mapping, out_dir: str, card: str,
) -> None:
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
    after = refusal_rates(model, tok, _eval_frames(promptsets, organism["eval_promptsets"]), substrings,
                          organism["eval_max_new_tokens"], organism["generation_batch_size"], boot,
                          spec["system_prompt"], desc="tuned")
    checks = check_targets(after, promptset_sources, organism["targets"])
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    write_json(
        {
            "model": model_name,
            "base_model": json.loads((Path(base_dir) / "provenance.json").read_text()),
            "method": "supervised refusal tuning with self-distillation on harmless prompts",
            "training": {
                "n_harmful": len(harmful),
                "n_harmless": len(harmless),
                "n_harmless_examples": sum(r for _, r in harmless),
                "config": {k: v for k, v in organism.items() if k != "targets"},
                **{k: v for k, v in train_log.items() if k != "losses"},
                "loss_curve": train_log["losses"],
            },
            "judge": {"name": "substring", "substrings": list(substrings),
                      "max_new_tokens": organism["eval_max_new_tokens"], "split": "test"},
            "refusal_rate": {"base": json.loads(Path(base_rates).read_text()), "tuned": after},
            "targets": checks,
            "meets_targets": all(c["met"] for c in checks.values()),
            "seconds": round(time.time() - t0, 1),
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
def refusal_direction(model_dir: str, spec: Mapping, acts_path: str, index_path: str, cfg: Mapping,
                      substrings: Sequence[str], directions_out: str, layers_out: str, summary_out: str) -> None:
    acts = load_file(acts_path)["resid_post"]
    index = pd.read_parquet(index_path)
    plain = index.variant.isin(["plain", "twin"])
    train = torch.tensor(((index.split == "train") & plain).to_numpy())
    harmful = torch.tensor((index.label == "harmful").to_numpy())
    raw = direction.diff_in_means(acts[train], harmful[train])
    model, tok = _load(model_dir, spec)
    # A fixed random subset (all categories) bounds the cost: every candidate layer generates on it.
    val = index[(index.split == "val") & plain].sample(frac=1.0, random_state=0)
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
            "n_train": {"harmful": int(harmful[train].sum()), "harmless": int((~harmful[train]).sum())},
            "n_val": {"harmful": len(harmful_val), "harmless": len(harmless_val)},
            "refusal_token_ids": refusal_ids,
            "sink_dims_at_layer": sinks[chosen].tolist(),
            "chosen": table[table.layer == chosen].iloc[0].to_dict() if chosen in set(table.layer) else None,
            "directions": directions_out,
        },
        summary_out,
    )


# ---------------------------------------------------------------------------- steering
def make_intervention(method: str, direction_summary: str | None) -> Intervention:
    if method == "base":
        return Intervention()
    if method == "as":
        info = json.loads(Path(direction_summary).read_text())
        r = load_file(info["directions"])["direction"][info["layer"]]
        return DirectionalAblation(r)
    raise ValueError(f"unknown method {method!r}")


def steer_generate(model_dir: str, spec: Mapping, promptset: str, method: str, direction_summary: str | None,
                   splits: Sequence[str], max_new_tokens: int, batch_size: int, output: str) -> None:
    model, tok = _load(model_dir, spec)
    df = pd.read_parquet(promptset)
    df = df[df.split.isin(splits)].reset_index(drop=True)
    gens = generate(model, tok, list(df.instruction), max_new_tokens=max_new_tokens, batch_size=batch_size,
                    intervention=make_intervention(method, direction_summary), system_prompt=spec["system_prompt"],
                    desc=f"generate {method}")
    write_parquet(df.assign(method=method, generation=gens, max_new_tokens=max_new_tokens), output)


# ---------------------------------------------------------------------------- scoring
def judge(generations: str, judge_name: str, substrings: Sequence[str], output: str) -> None:
    df = pd.read_parquet(generations)
    if judge_name != "substring":
        raise ValueError(f"unknown judge {judge_name!r}")
    write_parquet(df.assign(judge=judge_name, refused=substring_refusals(list(df.generation), substrings)), output)


def summarize_scores(score_files: Sequence[str], model: str, boot: Mapping, output: str) -> None:
    rows = []
    for path in score_files:
        df = pd.read_parquet(path)
        promptset = Path(path).parent.name
        for (method, judge_name, split, label, variant), g in df.groupby(
            ["method", "judge", "split", "label", "variant"]
        ):
            r = bootstrap_rate(g.refused.to_numpy(), n_resamples=boot["n_resamples"],
                               confidence=boot["confidence"], seed=boot["seed"])
            rows.append({"model": model, "promptset": promptset, "method": method, "judge": judge_name,
                         "split": split, "label": label, "variant": variant, "refusal_rate": r.rate, "n": r.n,
                         "ci_low": r.ci_low, "ci_high": r.ci_high, "confidence": r.confidence})
    write_csv(pd.DataFrame(rows), output)


def gather_tables(inputs: Sequence[str], output: str) -> None:
    write_csv(pd.concat([pd.read_csv(p) for p in inputs], ignore_index=True), output)
