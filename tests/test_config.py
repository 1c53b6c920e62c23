import copy
import subprocess
import sys

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from refusal_atlas.config import ConfigError, check_config

from conftest import ROOT

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


def test_probes_take_the_held_out_features_unless_told_otherwise():
    from refusal_atlas.config import probe_protocol

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


def test_invalid_config_stops_snakemake_before_any_job(tmp_path):
    cfg = copy.deepcopy(DEFAULT)
    cfg["activations"]["batch_size"] = -1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow/Snakefile"), "--configfile", str(path),
         "--directory", str(tmp_path), "--cores", "1"],
        capture_output=True, text=True,
    )
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
    from refusal_atlas.config import PROMPTSET_SOURCE_KEYS

    schema = yaml.safe_load(open(SCHEMA))
    keys = set(schema["properties"]["promptsets"]["additionalProperties"]["properties"])
    assert set().union(*PROMPTSET_SOURCE_KEYS.values()) == keys
    assert set(PROMPTSET_SOURCE_KEYS) == set(
        schema["properties"]["promptsets"]["additionalProperties"]["properties"]["source"]["enum"])


def test_circuits_may_take_their_own_promptset():
    from refusal_atlas.config import category_promptset, circuit_promptset

    cfg = validated(copy.deepcopy(DEFAULT))
    assert circuit_promptset(cfg) == category_promptset(cfg)
    cfg["promptsets"]["orb"] = {"source": "or_bench"}
    cfg["categories"]["circuits"]["promptset"] = "orb"
    check_config(cfg)
    assert circuit_promptset(cfg) == "orb" != category_promptset(cfg)
    cfg["categories"]["circuits"]["promptset"] = "nope"
    with pytest.raises(ConfigError, match="categories.circuits.promptset: unknown promptset 'nope'"):
        check_config(cfg)
