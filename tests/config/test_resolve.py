"""The one resolver of the config's nulls, and its agreement with the DAG of every shipped config.

The input functions decide from the resolved config whether a clamp gets steering_search's
hparams.json; the stage then takes what is still null from that file. If the two disagree, a job
either fails for want of c or K*, or reruns after every search for values it never reads.
"""

import json

import pytest
import yaml
from conftest import ROOT

from refusal_atlas.config.resolve import Clamp, read_search, steering_clamp
from refusal_atlas.steering.conditions import parse_condition

STEER = {"c": None, "k_star": None}


def test_a_condition_s_own_values_win_over_the_steering_section():
    assert steering_clamp(parse_condition("la_ig-global-heldout-k7-xm3"), {"c": -1, "k_star": 20}) == Clamp(7, -3.0)
    assert steering_clamp(parse_condition("la_ig-global-heldout"), {"c": -1, "k_star": 20}) == Clamp(20, -1)
    assert steering_clamp(parse_condition("base"), STEER) is None


def test_a_set_clamp_has_no_c_to_search():
    clamp = steering_clamp(parse_condition("la_ig-global-heldout-s4"), STEER)
    assert clamp == Clamp(None, None, uses_c=False) and clamp.searched == ("k_star",)
    assert clamp.require({"k_star": 9, "c": -2}, "x") == (9, None)


def test_only_what_the_config_leaves_null_comes_from_the_search():
    clamp = steering_clamp(parse_condition("la_ig-global-heldout-k5"), STEER)
    assert clamp.searched == ("c",)
    assert clamp.require({"k_star": 40, "c": -2.5}, "x") == (5, -2.5)
    assert Clamp(3, -1.0).searched == () and Clamp(3, -1.0).require(None, "x") == (3, -1.0)


def test_a_clamp_with_nothing_to_fill_it_is_a_clear_error():
    with pytest.raises(ValueError, match=r"dashboards: k_star and c are null in the config and no steering_search"):
        Clamp(None, None).require(None, "dashboards")
    with pytest.raises(ValueError, match=r"c are null"):
        Clamp(3, None).require({"k_star": 4}, "x")


def _shipped(tmp_path, tiny_model_dir):
    """(name, configfiles, replace_workflow_config) of every config the project ships."""
    test_cfg = yaml.safe_load((ROOT / ".test/config/config.yaml").read_text())
    test_cfg["models"]["tiny"]["path"] = str(tiny_model_dir)
    test_cfg["datasets"]["mirror"] = "http://127.0.0.1:9/"
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test_cfg))
    # the Snakefile's configfile, merged under the others where it exists (run from the checkout);
    # the .test DAG runs in a directory of its own, so its config stands alone
    default = ROOT / "config/config.yaml"
    return {
        "default": ([default], False),
        "embedded-ci": ([default, ROOT / ".ci/embedded-ci.yaml"], False),
        ".test": ([tmp_path / "test.yaml"], False),
        "gemma-2-2b-it": ([ROOT / "config/gemma-2-2b-it.yaml"], True),
        "llama-3.1-8b-instruct": ([ROOT / "config/llama-3.1-8b-instruct.yaml"], True),
        "paper": ([ROOT / "config/paper.yaml"], True),
    }


def planned_jobs(workdir, configfiles, replace):
    """Every job of the whole DAG (rule name, input keys, params), built offline in-process."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        wf_api = api.workflow(resource_settings=ResourceSettings(cores=1),
                              config_settings=ConfigSettings(configfiles=configfiles, replace_workflow_config=replace),
                              snakefile=ROOT / "workflow/Snakefile", workdir=workdir)
        wf_api.dag(DAGSettings())
        workflow = wf_api._workflow
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
        workflow._build_dag()
        return [(j.rule.name, dict(j.wildcards), set(j.input.keys()), dict(j.params)) for j in workflow.dag.jobs]


def stage_clamp(rule, params):
    """The clamp a stage is handed: in ``steering`` for the steered rules, in ``cfg`` for the others."""
    section = params["steering"] if rule in ("steer_generate", "capabilities") else params["cfg"]
    return section.get("clamp")


@pytest.mark.parametrize("name", ["default", "embedded-ci", ".test", "gemma-2-2b-it", "llama-3.1-8b-instruct",
                                  "paper"])
def test_input_functions_and_stages_agree_on_every_clamp_of_every_shipped_config(name, tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    configfiles, replace = _shipped(tmp_path, tiny_model_dir)[name]
    (tmp_path / "work").mkdir()
    jobs = planned_jobs(tmp_path / "work", configfiles, replace)
    hparams = tmp_path / "hparams.json"
    hparams.write_text(json.dumps({"chosen": {"k_star": 7, "c": -1.5}}))
    checked = 0
    for rule, wildcards, inputs, params in jobs:
        if rule not in ("steer_generate", "capabilities", "feature_dashboards", "category_steering"):
            continue
        cond = parse_condition(wildcards["method"]) if "method" in wildcards else None
        raw = stage_clamp(rule, params)
        if cond is not None and cond.kind != "clamp":
            assert raw is None and "hparams" not in inputs, (rule, wildcards)
            continue
        clamp = Clamp(**raw)
        searched = "hparams" in inputs
        # the file is an input exactly when the stage needs it, so a search reruns only its readers
        assert searched == bool(clamp.searched), (name, rule, wildcards, raw)
        k, c = clamp.require(read_search(str(hparams) if searched else None), rule)
        if cond is not None:
            assert k == (cond.k_star or (7 if "k_star" in clamp.searched else clamp.k_star))
            if cond.mode == "multiply" and cond.value is not None:
                assert c == cond.value
            if cond.mode == "set":
                assert c is None and not clamp.uses_c
        checked += 1
    assert checked, f"{name}: no clamped job planned"


def test_the_resolver_reads_only_the_model_s_own_sections():
    """Model overrides reach every resolved section (here steering.c), not just the rules that
    read ``steering`` directly."""
    from refusal_atlas.config.resolve import resolve
    from refusal_atlas.config.schema import check_schema
    from refusal_atlas.config.sections import for_model
    from snakemake.utils import validate

    cfg = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    schema = ROOT / "workflow/schemas/config.schema.yaml"
    check_schema(cfg, yaml.safe_load(schema.read_text()))
    validate(cfg, str(schema))
    seen = {}
    for model, spec in cfg["models"].items():
        c = (spec.get("overrides") or {}).get("steering", {}).get("c")
        resolved = resolve(for_model(cfg, model))
        seen[model] = c
        if c is not None:
            assert resolved.dashboards["clamp"]["c"] == c and resolved.categories["clamp"]["c"] == c
    assert len(set(seen.values())) > 1, f"paper.yaml gives its models the same c: {seen}"


def test_the_category_clamps_take_each_condition_s_c_and_a_model_s_own():
    """paper-reference.yaml: the union set at the model's c (-3 Gemma, -1 Llama), the specific,
    common and transfer sets at -3 on both; a model's override of one condition keeps the others."""
    from refusal_atlas.config.resolve import resolve
    from refusal_atlas.config.sections import for_model
    from snakemake.utils import validate

    schema = str(ROOT / "workflow/schemas/config.schema.yaml")
    cfg = yaml.safe_load((ROOT / "config/paper-reference.yaml").read_text())
    validate(cfg, schema)
    reference = {"specific": -3, "common": -3, "transfer": -3}
    for model, c in (("gemma-2-2b-it", -3), ("llama-3.1-8b-instruct", -1)):
        cat = resolve(for_model(cfg, model)).categories
        assert cat["clamp"]["c"] == c and cat["c_by_condition"] == reference
    cfg["models"]["llama-3.1-8b-instruct"]["overrides"]["categories"] = {"c_by_condition": {"all": -2}}
    validate(cfg, schema)
    assert resolve(for_model(cfg, "llama-3.1-8b-instruct")).categories["c_by_condition"] == {**reference, "all": -2}
    assert resolve(for_model(cfg, "gemma-2-2b-it")).categories["c_by_condition"] == reference
