"""Config checks that a JSON schema cannot express: cross-references between sections.

``workflow/schemas/config.schema.yaml`` checks types, ranges and enums (and fills defaults)
first; this names the offending key when a section refers to something that does not exist.
"""

from __future__ import annotations

from collections.abc import Mapping

from refusal_atlas.config.resolve import dashboard_protocol, resolve, steering_clamp
from refusal_atlas.config.schema import ConfigError
from refusal_atlas.steering.conditions import parse_condition

REFUSAL_DIRECTION_SPLIT_FILES: dict[str, str] = {
    f"{label}_{split}": f"splits/{label}_{split}.json"
    for label in ("harmful", "harmless")
    for split in ("train", "val", "test")
}


#: Sections a model may override (``models.<m>.overrides``): the paper tunes l* and c per model
#: (the §4.2 clamps' c too), and LA-IG's batch size is a memory budget.
OVERRIDABLE = ("direction", "features", "steering", "categories")


def _merge(base: Mapping, over: Mapping) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base[key], value) if isinstance(value, Mapping) and isinstance(base.get(key), Mapping) else value
    return out


def for_model(config: Mapping, model: str) -> dict:
    """The config one model's jobs see: its ``overrides`` merged key by key into
    :data:`OVERRIDABLE` sections, so one config can sweep models with their own l*, c or K*.
    """
    over = config["models"][model].get("overrides") or {}
    return {**config, **{name: _merge(config[name], over[name]) for name in OVERRIDABLE if name in over}}


def check_config(config: Mapping) -> None:
    promptsets = set(config["promptsets"])
    # the organism's prompt sets matter only where a model is tuned into one
    tuned = any(spec["refusal_tune"] for spec in config["models"].values())
    refs = {
        **({"organism.train_promptsets": config["organism"]["train_promptsets"],
            "organism.eval_promptsets": config["organism"]["eval_promptsets"]} if tuned else {}),
        **({"organism.harmful_promptsets": config["organism"]["harmful_promptsets"]}
           if tuned and config["organism"]["harmful_promptsets"] else {}),
        "activations.promptsets": config["activations"]["promptsets"],
        "evaluation.promptsets": config["evaluation"]["promptsets"],
        "direction.promptset": [config["direction"]["promptset"]],
        "features.promptsets": config["features"]["promptsets"],
        "guardrails.refusal.own_direction.promptsets": config["guardrails"]["refusal"]["own_direction"]["promptsets"],
    }
    for key, names in refs.items():
        unknown = [n for n in names if n not in promptsets]
        if unknown:
            raise ConfigError(f"{key}: unknown promptset(s) {unknown}; defined: {sorted(promptsets)}")
    if config["direction"]["promptset"] not in config["activations"]["promptsets"]:
        raise ConfigError(
            f"direction.promptset {config['direction']['promptset']!r} must also be listed in activations.promptsets"
        )
    for name, spec in config["promptsets"].items():
        if spec["source"] == "wildjailbreak" and "path" not in spec:
            raise ConfigError(f"promptsets.{name}: source wildjailbreak needs path (the local train TSV; the "
                              "dataset is gated: fetch it with your HF_TOKEN)")
        if spec["source"] == "benchmark" and "file" not in spec:
            raise ConfigError(f"promptsets.{name}: source benchmark needs file (e.g. processed/harmbench_test.json)")
        fr = spec.get("split_fractions")
        if spec["source"] == "bundled" and fr and abs(sum(fr.values()) - 1) > 1e-6:
            raise ConfigError(f"promptsets.{name}.split_fractions must sum to 1, got {sum(fr.values())}")
    feats = config["features"]
    if "heldout" in feats["protocols"] and feats["fit_split"] == feats["eval_split"]:
        raise ConfigError(
            f"features.fit_split and features.eval_split are both {feats['fit_split']!r}: the heldout "
            "protocol needs different splits (the transductive protocol already fits on the eval split)"
        )
    for model in config["models"]:
        _check_steering(for_model(config, model))
        _check_dashboards(for_model(config, model))
        _check_categories(for_model(config, model))
    _check_probes(config)
    ref = config["judges"]["fourlabel"]["reference_model"]
    if ref is not None and ref not in config["models"]:
        raise ConfigError(f"judges.fourlabel.reference_model {ref!r} is not a key of models {sorted(config['models'])}")
    for name, spec in config["models"].items():
        sae = spec["sae"]
        if sae["source"] == "train" and sae["k"] > sae["d_sae"]:
            raise ConfigError(f"models.{name}.sae.k ({sae['k']}) exceeds models.{name}.sae.d_sae ({sae['d_sae']})")


def feature_promptset(config: Mapping) -> str:
    return config["steering"]["feature_promptset"] or config["features"]["promptsets"][0]


# The keys of a promptset each source reads (the rest are other sources' defaults).
PROMPTSET_SOURCE_KEYS = {
    "bundled": {"source", "split_fractions", "seed", "adversarial_suffixes"},
    "refusal_direction": {"source", "max_per_split", "seed"},
    "benchmark": {"source", "file", "max_prompts"},
    "wildjailbreak": {"source", "path", "eval_path", "max_per_type", "split_fractions", "seed"},
    "catqa": {"source", "split_fractions", "max_per_split", "seed"},
    "or_bench": {"source", "split_fractions", "max_80k", "seed"},
    "contrast": {"source", "split_fractions", "seed"},
}
BENCHMARK_FILES = {"arc_challenge": "arc/ARC-Challenge/test-00000-of-00001.parquet",
                   "mmlu": "mmlu/all/test-00000-of-00001.parquet",
                   "gsm8k": "gsm8k/main/test-00000-of-00001.parquet",
                   "wmdp_bio": "wmdp/wmdp-bio/test-00000-of-00001.parquet",
                   "wmdp_cyber": "wmdp/wmdp-cyber/test-00000-of-00001.parquet"}
CATQA_FILE = "catqa/data/catqa_english.json"
PILE_FILE = "pile_uncopyrighted/train/00.head1000.jsonl"
OR_BENCH_FILES = {"toxic": "or_bench/or-bench-toxic.csv", "hard": "or_bench/or-bench-hard-1k.csv",
                  "extra": "or_bench/or-bench-80k.csv"}


def probe_promptset(config: Mapping) -> str:
    return config["probes"]["promptset"] or feature_promptset(config)


def _check_probes(config: Mapping) -> None:
    pr, feats = config["probes"], config["features"]
    name = probe_promptset(config)
    if name not in config["promptsets"]:
        raise ConfigError(f"probes.promptset: unknown promptset {name!r}; defined: {sorted(config['promptsets'])}")
    if config["promptsets"][name]["source"] not in ("bundled", "wildjailbreak"):
        raise ConfigError(f"probes.promptset {name!r} has no adversarial pairs: the probes need a bundled or "
                          "wildjailbreak promptset (jailbreak variants beside their plain request, harmless prompts)")
    if pr["selector"] not in feats["methods"]:
        raise ConfigError(f"probes.selector {pr['selector']!r} is not in features.methods")
    if pr["protocol"] is not None and pr["protocol"] not in feats["protocols"]:
        raise ConfigError(f"probes.protocol {pr['protocol']!r} is not in features.protocols")
    if (pr["k_star"] or 0) > feats["k_star"]:
        raise ConfigError(f"probes.k_star ({pr['k_star']}) exceeds features.k_star ({feats['k_star']})")
    if len({pr["fit_split"], pr["val_split"], pr["eval_split"]}) < 3:
        raise ConfigError("probes.fit_split, val_split and eval_split must be three different splits")


def _check_dashboards(config: Mapping) -> None:
    db, feats = config["dashboards"], config["features"]
    if not db["enabled"]:
        return
    unknown = sorted(set(db["methods"] or []) - set(feats["methods"]))
    if unknown:
        raise ConfigError(f"dashboards.methods {unknown} are not in features.methods")
    if db["contrast"] and config["promptsets"].get(db["contrast"], {}).get("source") != "contrast":
        raise ConfigError(f"dashboards.contrast {db['contrast']!r} is not a promptset of source contrast")
    if db["reference"]["selector"] not in feats["methods"]:
        raise ConfigError(f"dashboards.reference.selector {db['reference']['selector']!r} is not in features.methods")
    if dashboard_protocol(config) not in feats["protocols"]:
        raise ConfigError(f"dashboards.reference.protocol {dashboard_protocol(config)!r} is not in features.protocols")
    if (db["k_star"] or 0) > feats["k_star"]:
        raise ConfigError(f"dashboards.k_star ({db['k_star']}) exceeds features.k_star ({feats['k_star']})")
    if resolve(config).dashboard_clamp.searched and not _searchable(feats):
        raise ConfigError("dashboards: c/K* are null here and in steering, so they come from steering_search, "
                          "which needs heldout in features.protocols and la_ig in features.methods (or set both)")


def category_promptset(config: Mapping) -> str:
    return config["categories"]["promptset"] or feature_promptset(config)


def circuit_promptset(config: Mapping) -> str:
    return config["categories"]["circuits"]["promptset"] or category_promptset(config)


def _check_categories(config: Mapping) -> None:
    cat, feats = config["categories"], config["features"]
    if not cat["enabled"]:
        return
    name = category_promptset(config)
    if name not in config["promptsets"]:
        raise ConfigError(f"categories.promptset: unknown promptset {name!r}; defined: {sorted(config['promptsets'])}")
    if circuit_promptset(config) not in config["promptsets"]:
        raise ConfigError(f"categories.circuits.promptset: unknown promptset {circuit_promptset(config)!r}; "
                          f"defined: {sorted(config['promptsets'])}")
    if name not in config["activations"]["promptsets"]:
        raise ConfigError(f"categories.promptset {name!r} needs cached activations: add it to activations.promptsets")
    if cat["fit_split"] == cat["eval_split"]:
        raise ConfigError("categories.fit_split and eval_split must differ: circuits and clamps are scored held out")
    if resolve(config).category_clamp.searched and not _searchable(feats):
        raise ConfigError("categories: c is null here and in steering, so it comes from steering_search, which needs "
                          "heldout in features.protocols and la_ig in features.methods (or set categories.c)")


def _searchable(feats: Mapping) -> bool:
    """steering_search tunes c and K* on LA-IG's held-out sets, so it needs both fitted."""
    return "heldout" in feats["protocols"] and "la_ig" in feats["methods"]


def _check_steering(config: Mapping) -> None:
    feats, steer = config["features"], config["steering"]
    conds = {}
    for key in ("evaluation.methods", "capabilities.methods"):
        section, field = key.split(".")
        for name in config[section][field] or []:
            try:
                conds[name] = parse_condition(name)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
    if steer["feature_promptset"] is not None and steer["feature_promptset"] not in feats["promptsets"]:
        raise ConfigError(f"steering.feature_promptset {steer['feature_promptset']!r} is not in features.promptsets")
    for name, c in conds.items():
        if c.kind != "clamp":
            continue
        need = "la_ig" if c.selector == "random" else c.selector
        if need not in feats["methods"]:
            raise ConfigError(f"evaluation.methods: {name} needs {need!r} in features.methods")
        if c.protocol not in feats["protocols"]:
            raise ConfigError(f"evaluation.methods: {name} needs {c.protocol!r} in features.protocols")
        if c.k_star is not None and c.k_star > feats["k_star"]:
            raise ConfigError(f"evaluation.methods: {name} clamps K*={c.k_star} > features.k_star ({feats['k_star']})")
    for name in config["capabilities"]["methods"] or []:
        if conds[name].scope == "local":
            raise ConfigError(f"capabilities.methods: {name} is local; local sets exist for harmful prompts only")
    if any(c.kind == "clamp" and steering_clamp(c, steer).searched for c in conds.values()) and not _searchable(feats):
        raise ConfigError("steering.c/k_star are null, so steering_search tunes them on LA-IG's held-out sets: "
                          "features.protocols needs heldout and features.methods needs la_ig (or set both)")
    too_big = [k for k in steer["search"]["k_values"] if k > feats["k_star"]]
    if steer["k_star"] is not None:
        too_big += [steer["k_star"]] if steer["k_star"] > feats["k_star"] else []
    if too_big:
        raise ConfigError(f"steering: K* {too_big} exceed features.k_star ({feats['k_star']}); sets are top-K* "
                          "prefixes of the selected sets")


























