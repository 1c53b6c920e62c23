"""Stages of workflow/rules/capabilities.smk: what each condition costs in capability."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from refusal_atlas.core.io import write_json, write_table
from refusal_atlas.core.stats import bootstrap_mean, bootstrap_rate
from refusal_atlas.data.datasets import CAPABILITY_BENCHMARKS, read_jsonl_text
from refusal_atlas.data.prompts import sample_rows
from refusal_atlas.pipeline.scoring import condition_columns
from refusal_atlas.steering.conditions import parse_condition

log = logging.getLogger("refusal_atlas")


# ---------------------------------------------------------------------------- capabilities
TEXT_SOURCES = {"sae_corpus": "sae_corpus held-out", "pile": "the Pile (monology/pile-uncopyrighted), first documents"}


def generic_texts(path: str, source: str, n: int | None) -> list[str]:
    """Text CE's texts: a seeded sample of the SAE corpus's held-out sequences, or (``pile``) the
    first ``n`` documents in the order Yeo et al.'s stream reads them."""
    if source == "pile":
        texts = read_jsonl_text(path)
        return texts if n is None else texts[:n]
    rows = pd.read_parquet(path)
    return list(sample_rows(rows[rows.split == "heldout"], n).instruction)


def capabilities(*, model_dir: str, spec: Mapping, method: str, inputs: Mapping, base_generations: Sequence[str],
                 text: str, cfg: Mapping, steering_cfg: Mapping, boot: Mapping, output: str) -> None:
    """CE (nats/token) of the unsteered model's answers to harmless prompts and of generic text,
    under one condition (Yeo et al. 2025 §4.1, normalised per response token)."""
    from refusal_atlas.evaluation import benchmarks, cross_entropy
    from refusal_atlas.pipeline.openers import benchmark_sample, make_intervention, open_model

    cond = parse_condition(method)
    if cond.scope == "local":
        raise ValueError(f"{method}: local sets exist for harmful prompts only; capabilities take global conditions")
    model, tok, system_prompt = open_model(model_dir, spec)
    intervention, meta = make_intervention(cond, model, spec, inputs, steering_cfg)
    answers = pd.concat([pd.read_parquet(p) for p in base_generations], ignore_index=True)
    answers = sample_rows(answers[answers.label == "harmless"], cfg["max_prompts"])
    texts = generic_texts(text, cfg["ce_text"], cfg["max_texts"])
    kw = dict(intervention=intervention, batch_size=cfg["batch_size"])
    # the reference's reduction: one value per batch of consecutive items, not one per item
    batches = cfg["ce_reference_batch"] if cfg["ce_reduction"] == "reference_batch" else {}
    resp = cross_entropy.response_ce(model, tok, list(answers.instruction), list(answers.generation),
                                     system_prompt=system_prompt, reference_batch=batches.get("responses"), **kw)
    text_ce = cross_entropy.text_ce(model, tok, texts, max_tokens=cfg["max_text_tokens"],
                                    reference_batch=batches.get("text"), **kw)
    out = {"method": method, "condition": meta, "ce_reduction": cfg["ce_reduction"]}
    for key, values in (("response_ce", resp), ("text_ce", text_ce)):
        v = values[np.isfinite(values)]
        r = bootstrap_mean(v, **boot)
        out[key] = {"mean": r.rate, "n": r.n, "ci_low": r.ci_low, "ci_high": r.ci_high}
        log.info("%s %s: %s nats/token", method, key, r)
    out["sources"] = {"responses": "base generations on harmless test prompts", "text": TEXT_SOURCES[cfg["ce_text"]]}
    for name in cfg["benchmarks"]:
        items = benchmark_sample(name, inputs[name], cfg["benchmark_max_items"][name])
        if name == "gsm8k":
            correct = benchmarks.gsm8k(model, tok, items, max_new_tokens=cfg["gsm8k_max_new_tokens"],
                                       system_prompt=system_prompt, protocol=cfg["gsm8k_protocol"], **kw)
        else:
            correct = benchmarks.multiple_choice(model, tok, items, system_prompt=system_prompt, desc=name,
                                                 protocol=cfg["choice_protocol"], **kw)
        r = bootstrap_rate(correct, **boot)
        out[name] = {"mean": r.rate, "n": r.n, "ci_low": r.ci_low, "ci_high": r.ci_high}
        protocol = cfg["gsm8k_protocol"] if name == "gsm8k" else cfg["choice_protocol"]
        out["sources"][name] = f"{Path(inputs[name]).name}, zero-shot accuracy ({protocol})"
        log.info("%s %s: accuracy %s", method, name, r)
    write_json(out, output)


def capabilities_table(*, files: Sequence[str], model: str, output: str) -> None:
    rows = []
    for path in files:
        d = json.loads(Path(path).read_text())
        for key in ("response_ce", "text_ce", *CAPABILITY_BENCHMARKS):
            if key in d:  # the benchmarks only where capabilities.benchmarks lists them
                rows.append({"model": model, "method": d["method"], **condition_columns(d["method"]), "measure": key,
                             **d[key]})
    df = pd.DataFrame(rows)
    base = df[df.method == "base"].set_index("measure")["mean"]
    df["delta_vs_base"] = df["mean"] - df.measure.map(base) if len(base) else np.nan
    write_table(df, output)
