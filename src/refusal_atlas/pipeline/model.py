"""Stages of workflow/rules/model.smk: the model source, the refusal organism and its card."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd

from refusal_atlas.core.io import atomic_path, write_json
from refusal_atlas.core.stats import bootstrap_rate
from refusal_atlas.evaluation.substring_judge import substring_refusals
from refusal_atlas.lm.generation import generate
from refusal_atlas.lm.organism import HarmlessCase, OrganismConfig, build_examples
from refusal_atlas.lm.organism import refusal_tune as tune_organism
from refusal_atlas.lm.sources import prepare_model as prepare_source
from refusal_atlas.pipeline.openers import open_model

log = logging.getLogger("refusal_atlas")


# ---------------------------------------------------------------------------- model
def prepare_model(*, spec: Mapping, output: str) -> None:
    prepare_source(dict(spec), output)


def _organism_config(cfg: Mapping) -> OrganismConfig:
    names = {f.name for f in fields(OrganismConfig)}
    return OrganismConfig(**{k: v for k, v in cfg.items() if k in names})


def organism_training_prompts(
    frames: Sequence[pd.DataFrame], max_harmful: int | None, harmless_per_harmful: float, contrastive_repeats: int,
    seed: int, contrastive_weight: float = 1.0,
) -> tuple[list[tuple[str, str]], list[HarmlessCase]]:
    """Plain harmful train prompts; harmless ones as :class:`HarmlessCase` (prompt, repeats, loss
    weight, whether contrastive).

    Matched twins (the contrast set's safe prompts among them) and over-refusal bait are the
    contrastive cases: without them the organism learns to refuse on alarming words ("pipe",
    "kill") instead of on harm. They all come in, ``contrastive_repeats`` times each with loss
    weight ``contrastive_weight``, with the harmful requests they are twinned with; other
    prompts fill the quotas (a weighted case counts once toward them).
    """
    df = pd.concat(frames, ignore_index=True)
    df = df[df.split == "train"].copy()
    df["_key"] = np.random.default_rng(seed).random(len(df))
    harmless = df[df.label == "harmless"]
    contrastive = harmless[harmless.variant.isin(["twin", "bait"])].sort_values("_key")
    harmful = df[(df.label == "harmful") & (df.variant == "plain")].copy()
    harmful["_rank"] = (~harmful.pair_id.isin(contrastive.pair_id)).astype(int)  # twinned requests first
    harmful = harmful.sort_values(["_rank", "_key"])
    harmful = harmful if max_harmful is None else harmful.head(max_harmful)
    quota = int(round(harmless_per_harmful * len(harmful))) - contrastive_repeats * len(contrastive)
    fill = harmless[~harmless.variant.isin(["twin", "bait"])].sort_values("_key").head(max(quota, 0))
    pairs = ([HarmlessCase(p, contrastive_repeats, contrastive_weight, True) for p in contrastive.instruction]
             + [HarmlessCase(p) for p in fill.instruction])
    return list(zip(harmful.id, harmful.instruction)), pairs


def training_frames(promptsets: Mapping[str, str], organism: Mapping) -> list[pd.DataFrame]:
    """The organism's training promptsets; those outside ``harmful_promptsets`` (when set) give
    their harmless prompts only, e.g. the contrast set's safe look-alikes without their unsafe
    twins, so the harmful side keeps its own mix."""
    keep = organism.get("harmful_promptsets")
    frames = []
    for name in organism["train_promptsets"]:
        df = pd.read_parquet(promptsets[name])
        frames.append(df if keep is None or name in keep else df[df.label != "harmful"])
    return frames


def refusal_rates(
    model, tok, frames: Mapping[str, pd.DataFrame], substrings: Sequence[str], max_new_tokens: int,
    batch_size: int, boot: Mapping, system_prompt: str | None, desc: str, by_type: Collection[str] = (),
) -> dict[str, dict]:
    """Refusal rate per ``promptset/label/variant`` group of the test splits, and for the
    promptsets in ``by_type`` (the contrast set) per ``promptset/label/variant/category`` too."""
    out = {}
    for name, df in frames.items():
        test = df[(df.split == "test") & (df.variant != "jailbreak")].reset_index(drop=True)
        gens = generate(model, tok, list(test.instruction), max_new_tokens=max_new_tokens,
                        batch_size=batch_size, system_prompt=system_prompt, desc=f"{desc} {name}")
        refused = np.array(substring_refusals(gens, substrings))
        keys = ["label", "variant"] + (["category"] if name in by_type else [])
        groups = {**test.groupby(["label", "variant"]).groups,
                  **(test.groupby(keys).groups if name in by_type else {})}
        for key, idx in groups.items():
            rate = bootstrap_rate(refused[np.asarray(idx)], n_resamples=boot["n_resamples"],
                                  confidence=boot["confidence"], seed=boot["seed"])
            out["/".join((name, *key))] = rate.as_dict()
            log.info("%s %s refusal %s", desc, "/".join((name, *key)), rate)
    return out


def check_targets(rates: Mapping[str, dict], sources: Mapping[str, str], targets: Mapping[str, float]) -> dict:
    """Compare the tuned rates with the organism's goals: bundled, reference datasets and the
    contrast set (its safe prompts overall and per type; its unsafe ones against their own goal)."""
    checks = {}
    for key, r in rates.items():
        name, label, variant, *typed = key.split("/")
        source = sources[name]
        prefix = "" if source == "bundled" else "reference_"
        if label == "harmful" and variant == "plain" and not typed:
            own = source == "contrast" and "contrast_harmful_min" in targets
            goal = f">= {targets['contrast_harmful_min' if own else prefix + 'harmful_min']}"
        elif source == "contrast" and label == "harmless":
            goal = f"<= {targets['contrast_type_max' if typed else 'contrast_harmless_max']}"
        elif label == "harmless" and variant in ("twin", "plain"):
            goal = f"<= {targets[prefix + 'harmless_max']}"
        else:
            continue
        level = float(goal.split()[-1])
        ok = r["rate"] >= level if goal.startswith(">=") else r["rate"] <= level
        checks[key] = {"rate": r["rate"], "goal": goal, "met": bool(ok)}
    return checks


def _organism_rates(model, tok, system_prompt: str | None, promptsets: Mapping[str, str], organism: Mapping,
                    substrings: Sequence[str], boot: Mapping, desc: str,
                    by_type: Collection[str] = ()) -> dict[str, dict]:
    """Refusal on the organism's evaluation sets, as its card reports it before and after tuning."""
    frames = {name: pd.read_parquet(promptsets[name]) for name in organism["eval_promptsets"]}
    return refusal_rates(model, tok, frames, substrings, organism["eval_max_new_tokens"],
                         organism["generation_batch_size"], boot, system_prompt, desc=desc, by_type=by_type)


def _typed(sources: Mapping[str, str]) -> list[str]:
    return [name for name, source in sources.items() if source == "contrast"]


def base_refusal(*, base_dir: str, promptsets: Mapping[str, str], promptset_sources: Mapping[str, str],
                 spec: Mapping, organism: Mapping, substrings: Sequence[str], boot: Mapping, output: str) -> None:
    """Refusal of the model before tuning, on the organism's evaluation sets (its card's "base")."""
    model, tok, system_prompt = open_model(base_dir, spec)
    rates = _organism_rates(model, tok, system_prompt, promptsets, organism, substrings, boot, desc="base",
                            by_type=_typed(promptset_sources))
    write_json(rates, output)


def refusal_tune(*, base_dir: str, promptsets: Mapping[str, str], spec: Mapping, organism: Mapping,
                 out_dir: str) -> None:
    """Tune the base model into the refusal organism; ``training.json`` in ``out_dir`` records how.

    Only training keys reach it, so a judging or statistics edit reruns the card, not this.
    """
    t0 = time.time()
    cfg = _organism_config(organism)
    model, tok, _ = open_model(base_dir, spec)
    harmful, harmless = organism_training_prompts(
        training_frames(promptsets, organism), organism["max_harmful"],
        organism["harmless_per_harmful"], organism["contrastive_repeats"], organism["seed"],
        organism["contrastive_weight"],
    )
    log.info("organism data: %d harmful, %d harmless training prompts (%d examples)", len(harmful),
             len(harmless), sum(h.repeats for h in harmless))
    examples = build_examples(model, tok, harmful, harmless, cfg)
    train_log = tune_organism(model, tok, examples, cfg)
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps({
            "method": "supervised refusal tuning with self-distillation on harmless prompts",
            "n_harmful": len(harmful),
            "n_harmless": len(harmless),
            "n_harmless_examples": sum(h.repeats for h in harmless),
            "config": dict(organism),
            **{k: v for k, v in train_log.items() if k != "losses"},
            "loss_curve": train_log["losses"],
            "seconds": round(time.time() - t0, 1),
        }, indent=2) + "\n")


def organism_card(*, model_name: str, base_dir: str, tuned_dir: str, base_rates: str, promptsets: Mapping[str, str],
                  promptset_sources: Mapping[str, str], spec: Mapping, organism: Mapping, substrings: Sequence[str],
                  boot: Mapping, card: str) -> None:
    """The organism's card: refusal before and after tuning on held-out prompts, against its goals."""
    t0 = time.time()
    model, tok, system_prompt = open_model(tuned_dir, spec)
    after = _organism_rates(model, tok, system_prompt, promptsets, organism, substrings, boot, desc="tuned",
                            by_type=_typed(promptset_sources))
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
