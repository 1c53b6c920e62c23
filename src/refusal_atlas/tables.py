"""The workflow's light stages: downloads, prompt sets, gathering, judging by substrings, rates,
the result tables and the stage figures.

Like :mod:`refusal_atlas.stages`, one function per rule of the same name; these need neither
torch nor an SAE library, so their many small jobs start in about a second.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from . import conditions, datasets, plots, prompts
from .datasets import CAPABILITY_BENCHMARKS
from .io import write_parquet, write_table
from .judges import substring_refusals
from .plots import save_figure
from .logs import logged  # noqa: F401  (every script enters its stage through it)
from .stats import bootstrap_rate

log = logging.getLogger("refusal_atlas")


# ---------------------------------------------------------------------------- generations
def gather_generations(shards: Sequence[str], output: str) -> None:
    df = pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True)
    if df.id.duplicated().any():
        raise ValueError(f"prompt ids repeat across shards: {sorted(df.id[df.id.duplicated()])[:3]}")
    write_parquet(df, output)


# ---------------------------------------------------------------------------- scoring
def judge(generations: str, judge_name: str, substrings: Sequence[str], output: str) -> None:
    df = pd.read_parquet(generations)
    if judge_name != "substring":
        raise ValueError(f"unknown judge {judge_name!r}")
    write_parquet(df.assign(judge=judge_name, refused=substring_refusals(list(df.generation), substrings)), output)


def summarize_scores(score_files: Sequence[str], model: str, boot: Mapping, output: str) -> None:
    """Per condition, judge and prompt group: the judged rate with n and a bootstrap interval.

    The substring judge measures refusal; the HarmBench classifier measures jailbreak (harmful
    compliance), on harmful prompts only. Unparseable classifier answers are left out of n.
    """
    rows = []
    for path in score_files:
        df = pd.read_parquet(path)
        promptset = Path(path).parent.name
        judge_name = df.judge.iloc[0] if len(df) else Path(path).name.split(".")[-2]
        metric, column = ("refusal", "refused") if judge_name == "substring" else ("jailbreak", "jailbroken")
        if metric == "jailbreak":
            df = df[df.label == "harmful"]
        for (method, split, label, variant), g in df.groupby(["method", "split", "label", "variant"]):
            values = g[column].dropna().astype(float).to_numpy()
            if len(values):
                rows.append({"model": model, "promptset": promptset, "method": method, "judge": judge_name,
                             "metric": metric, "split": split, "label": label, "variant": variant,
                             **bootstrap_rate(values, **boot).as_dict(), "n_unparsed": int(g[column].isna().sum())})
    write_table(pd.DataFrame(rows), output)


def gather_tables(inputs: Sequence[str], output: str) -> None:
    write_table(pd.concat([pd.read_csv(p) for p in inputs], ignore_index=True), output)


# ---------------------------------------------------------------------------- tables and figures
PAPER_NAMES = {"base": "Base", "as": "AS", "add": "AS-add", "cossim": "CosSim", "actdiff": "ActDiff", "ap": "AP",
               "la_ig": "LA-IG (Ours)", "random": "Random"}


def _condition_columns(method: str) -> dict:
    c = conditions.parse_condition(method)
    name = PAPER_NAMES[c.selector or c.name]
    return {"name": name, "selector": c.selector or c.name, "scope": c.scope, "protocol": c.protocol,
            "mode": c.mode, "set_value": c.value if c.mode == "set" else None}


def benchmark_table(summaries: Sequence[str], judges: Sequence[str], caption: Mapping[str, str], output: str,
                    figure_stem: str) -> None:
    """Jailbreak rate per method and dataset (Yeo et al. 2025, Table 1), each with n and its CI.

    With the substring judge the jailbreak rate is 1 − refusal on harmful prompts (the interval
    flips with it); with HarmBench it is the classifier's "yes" rate.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.concat([pd.read_csv(p) for p in summaries], ignore_index=True)
    df = df[(df.label == "harmful") & df.judge.isin(judges)]
    df = df[~df.method.map(lambda m: conditions.parse_condition(m).mode == "set" or m == "add")]
    sub = df.metric == "refusal"
    out = df.assign(jailbreak_rate=np.where(sub, 1 - df.rate, df.rate), ci_low=np.where(sub, 1 - df.ci_high, df.ci_low),
                    ci_high=np.where(sub, 1 - df.ci_low, df.ci_high))
    out = pd.concat([out.reset_index(drop=True), pd.DataFrame([_condition_columns(m) for m in out.method])], axis=1)
    cols = ["model", "promptset", "split", "variant", "judge", "method", "name", "selector", "scope", "protocol",
            "jailbreak_rate", "n", "ci_low", "ci_high", "confidence"]
    out = out[cols].sort_values(["model", "promptset", "variant", "judge", "method"])
    write_table(out, output)

    plain = out[out.variant == "plain"]
    groups = list(plain.groupby(["model", "judge"]))
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.6 * len(groups)), squeeze=False)
    for ax, ((model, judge_name), g) in zip(axes[:, 0], groups):
        methods = sorted(g.method.unique(), key=lambda m: (list(PAPER_NAMES).index(_condition_columns(m)["selector"]), m))
        sets = sorted(g.promptset.unique())
        width = 0.8 / len(sets)
        for j, ps in enumerate(sets):
            gg = g[g.promptset == ps].set_index("method").reindex(methods)
            x = np.arange(len(methods)) + j * width
            err = np.vstack([gg.jailbreak_rate - gg.ci_low, gg.ci_high - gg.jailbreak_rate])
            n = int(gg.n.max()) if gg.n.notna().any() else 0
            ax.bar(x, gg.jailbreak_rate, width, yerr=err, capsize=2, label=f"{ps} (n={n})")
        ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("jailbreak rate")
        ax.set_title(f"{model}: held-out harmful prompts, judge {judge_name} ({caption.get(judge_name, judge_name)}); "
                     "95% bootstrap CI", fontsize=9)
        ax.legend(fontsize=8)
    save_figure(fig, figure_stem)
    plt.close(fig)


def induction_table(summaries: Sequence[str], output: str, figure_stem: str) -> None:
    """Refusal induced on harmless prompts: the ``set`` clamp swept over values, against AS-add."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.concat([pd.read_csv(p) for p in summaries], ignore_index=True)
    df = df[(df.label == "harmless") & (df.metric == "refusal")]
    keep = df.method.map(lambda m: m in ("base", "add") or conditions.parse_condition(m).mode == "set")
    out = df[keep].reset_index(drop=True)
    out = pd.concat([out, pd.DataFrame([_condition_columns(m) for m in out.method])], axis=1)
    out = out.rename(columns={"rate": "refusal_rate"})
    write_table(out, output)

    groups = list(out.groupby(["model", "promptset"]))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.5 * max(1, len(groups)), 3.8), squeeze=False)
    for ax, ((model, ps), g) in zip(axes[0], groups):
        g = g.groupby(["method", "name", "selector", "scope", "protocol", "set_value"], dropna=False).apply(
            lambda x: pd.Series({"refusal_rate": np.average(x.refusal_rate, weights=x.n), "n": x.n.sum()}),
            include_groups=False).reset_index()
        sets = g[g.set_value.notna()]
        for (sel, scope, prot), s in sets.groupby(["selector", "scope", "protocol"]):
            s = s.sort_values("set_value")
            ax.plot(s.set_value, s.refusal_rate, marker="o", label=f"{PAPER_NAMES[sel]} set ({scope}, {prot})")
        for m, style in (("add", "--"), ("base", ":")):
            row = g[g.method == m]
            if len(row):
                ax.axhline(float(row.refusal_rate.iloc[0]), ls=style, color="k", label=f"{PAPER_NAMES[m]}")
        ax.set_xlabel("set value (x mean max activation on harmful prompts)")
        ax.set_ylabel("refusal rate (substring judge)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{model}: harmless {ps} prompts (test), n={int(g.n.max())}", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, figure_stem)
    plt.close(fig)


def capabilities_table(files: Sequence[str], model: str, output: str) -> None:
    rows = []
    for path in files:
        d = json.loads(Path(path).read_text())
        for key in ("response_ce", "text_ce", *CAPABILITY_BENCHMARKS):
            if key in d:  # the benchmarks only where capabilities.benchmarks lists them
                rows.append({"model": model, "method": d["method"], **_condition_columns(d["method"]), "measure": key,
                             **d[key]})
    df = pd.DataFrame(rows)
    base = df[df.method == "base"].set_index("measure")["mean"]
    df["delta_vs_base"] = df["mean"] - df.measure.map(base) if len(base) else np.nan
    write_table(df, output)


# ---------------------------------------------------------------------------- data
def download_dataset(entry: Mapping, dest: str, mirror: str | None, timeout: float) -> None:
    """Fetch one manifest entry (``datasets.DatasetFile`` as a dict) to ``dest``, checked."""
    datasets.download(datasets.DatasetFile(**entry), dest, mirror=mirror, timeout=timeout)


def build_promptsets(spec: Mapping, inputs: Mapping[str, str], output: str) -> None:
    if spec["source"] == "bundled":
        suffixes = prompts.read_suffixes(inputs["suffixes"]) if inputs.get("suffixes") else ()
        df = prompts.bundled_promptset(Path(inputs["pairs"]).parent, spec["split_fractions"], spec["seed"], suffixes)
    elif spec["source"] == "wildjailbreak":
        df = prompts.wildjailbreak_promptset(inputs["train"], inputs.get("eval"), spec["split_fractions"],
                                             spec["max_per_type"], spec["seed"])
    elif spec["source"] == "catqa":
        harmless = {k: v for k, v in inputs.items() if k.startswith("harmless_")}
        df = prompts.catqa_promptset(inputs["catqa"], harmless, spec["split_fractions"], spec["max_per_split"],
                                     spec["seed"])
    elif spec["source"] == "or_bench":
        df = prompts.or_bench_promptset(inputs["toxic"], inputs["hard"], inputs.get("extra"), spec["split_fractions"],
                                        spec["max_80k"], spec["seed"])
    elif spec["source"] == "benchmark":
        df = prompts.benchmark_promptset(inputs["file"], Path(spec["file"]).stem, spec.get("max_prompts", 100))
    else:
        df = prompts.refusal_direction_promptset(inputs, spec["max_per_split"], spec["seed"])
    counts = df.groupby(["split", "label", "variant"]).size()
    log.info("prompt set counts:\n%s", counts.to_string())
    write_parquet(df, output)


# ---------------------------------------------------------------------------- SAE quality
def sae_quality_table(files: Sequence[str], model: str, targets: Mapping[str, float], output: str) -> None:
    df = pd.DataFrame([json.loads(Path(p).read_text()) for p in files]).assign(model=model)
    df["meets_targets"] = (df.explained_variance >= targets["explained_variance_min"]) & (
        df.ce_recovered >= targets["ce_recovered_min"])
    write_table(df, output)


# ---------------------------------------------------------------------------- figures
def organism_figure(card: str, caption: str, stem: str) -> None:
    plots.organism_figure(json.loads(Path(card).read_text()), caption, stem)


def direction_figure(layers: str, summary: str, caption: str, stem: str, kl_max: float | None) -> None:
    n = json.loads(Path(summary).read_text())
    caption = (f"{caption}; r fitted on {n['n_train']['harmful']}+{n['n_train']['harmless']} train prompts, "
               f"scored on {n['n_val']['harmful']}+{n['n_val']['harmless']} val (harmful+harmless)")
    plots.direction_figure(pd.read_parquet(layers), caption, stem, kl_max)


def sae_quality_figure(table: str, targets: Mapping[str, float], caption: str, stem: str) -> None:
    q = pd.read_csv(table)
    lo, hi = int(q.n_tokens.min()), int(q.n_tokens.max())
    caption = f"{caption}; n = {lo if lo == hi else f'{lo}–{hi}'} tokens per layer"
    plots.sae_quality_figure(q, dict(targets), caption, stem)
