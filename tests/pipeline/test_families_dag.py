"""The DAG's core on one tiny random model per chat family at once: Llama-3.1 (with JumpReLU SAEs,
Llama Scope's architecture, read from SAELens directories on disk, ``sae.source: local``),
Qwen2.5 and Mistral-Instruct (SAEs trained in the workflow). Gemma-2 runs the whole DAG through
SLURM in test_workflow.py, and the ChatML Llama (the embedded default's format) the DAG's core in
test_fault_injection.py. Each family goes through prepare_model, activations, the
refusal direction, its SAEs and their quality, LA-IG, selection, clamped generation, the judge and
the benchmark table, in the reference modes of docs/fidelity.md (nested LA-IG, header positions,
the pre-ablation patch error, a harmful-only benchmark fitted on its own prompts; on Llama-3.1
also the pinned §4.2 category clamps), beside the project's modes, which the Gemma-2 DAG runs.
"""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from conftest import FAMILY_CORPUS, ROOT

from refusal_atlas.testing.families import FAMILIES, save_tiny_chat_model
from refusal_atlas.testing.synthetic import random_saes

pytestmark = pytest.mark.workflow

MODELS = {"fam-l3": "llama3", "fam-q2": "qwen2", "fam-mi": "mistral"}
LAYERS = [1, 3]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def family_config(work, mirror_url):
    """.test/config-families over .test/config, its models built under ``work``."""
    over = yaml.safe_load((ROOT / ".test/config-families/config.yaml").read_text())
    cfg = _merge(yaml.safe_load((ROOT / ".test/config/config.yaml").read_text()), {**over, "models": {}})
    cfg["models"] = over["models"]
    assert set(cfg["models"]) == set(MODELS)
    for name, family in MODELS.items():
        save_tiny_chat_model(FAMILIES[family], work / cfg["models"][name]["path"], FAMILY_CORPUS)
        sae = cfg["models"][name]["sae"]
        if sae["source"] == "local":
            for layer, s in random_saes(64, 96, sae["layers"], "cpu", torch.float32, kind="jumprelu").items():
                s.threshold.data.fill_(0.01)  # below the random pre-activations, so latents fire
                s.save_model(work / sae["path"].format(layer=layer))
    cfg["datasets"]["mirror"] = mirror_url
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def families_run(tmp_path_factory, mirror_url):
    work = tmp_path_factory.mktemp("families")
    config = family_config(work, mirror_url)
    targets = ["results/tables/benchmark.csv", *[f"results/saes/{m}/quality.csv" for m in MODELS],
               "results/categories/fam-l3/steering.parquet"]
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow/Snakefile"), "--configfile", str(config),
         "--replace-workflow-config", "--directory", str(work), "--cores", "2", "--show-failed-logs", *targets],
        capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-6000:]
    return work


def test_every_family_reaches_the_benchmark_table(families_run):
    table = pd.read_csv(families_run / "results/tables/benchmark.csv")
    for model in MODELS:
        rows = table[table.model == model]
        assert set(rows.method) >= {"as", "la_ig-global-heldout"}, (model, sorted(rows.method))
        assert (rows.n > 0).all() and rows.jailbreak_rate.between(0, 1).all()


def test_generations_are_decoded_chat_answers_of_each_family(families_run):
    for model, family in MODELS.items():
        gens = pd.read_parquet(families_run / f"results/generations/{model}/bundled/base.parquet")
        assert len(gens) and gens.generation.map(lambda t: isinstance(t, str)).all()
        tied = json.loads((families_run / f"models/{model}/config.json").read_text()).get("tie_word_embeddings")
        if not tied:  # a random tied model repeats its last prompt token, a newline, which strips to ""
            assert (gens.generation.str.strip() != "").mean() > 0.5, model  # text, not only special tokens
        # the family's own turn markers never leak into an answer: generation stops on end of turn
        assert not gens.generation.str.contains(FAMILIES[family].end_of_turn, regex=False).any()


def test_local_jumprelu_saes_are_checked_copies_and_trained_ones_topk(families_run):
    for model, family in MODELS.items():
        for layer in LAYERS:
            cfg = json.loads((families_run / f"results/saes/{model}/layer_{layer}/cfg.json").read_text())
            assert cfg["architecture"] == ("jumprelu" if family == "llama3" else "topk")
            assert cfg["d_in"] == 64 and cfg["metadata"]["hook_name"] == f"blocks.{layer}.hook_resid_post"
        quality = pd.read_csv(families_run / f"results/saes/{model}/quality.csv")
        assert sorted(quality.layer) == LAYERS
    assert (families_run / "logs/local_sae/fam-l3/layer_1.log").is_file()
    assert not (families_run / "logs/train_sae/fam-l3").exists()


def test_a_harmful_only_benchmark_is_fitted_on_its_own_prompts_with_borrowed_harmless_ones(families_run):
    table = pd.read_csv(families_run / "results/tables/benchmark.csv")
    for model in MODELS:
        summary = json.loads((families_run / f"results/features/{model}/jbb/attribution.transductive.json").read_text())
        assert summary["n_borrowed_harmless"] == summary["n"]["local"] > 0
        rows = table[(table.model == model) & (table.promptset == "jbb")]
        assert set(rows.method) == {"base", "as", "la_ig-global-heldout"}, (model, sorted(rows.method))
        # the held-out condition comes from the feature promptset: jbb has no sets of its own but this fit
        assert not (families_run / f"results/features/{model}/jbb/attribution.heldout.json").exists()


def test_the_reference_s_pinned_category_clamps_ran_on_llama(families_run):
    rates = pd.read_parquet(families_run / "results/categories/fam-l3/steering.parquet")
    assert {"base", "all", "specific", "common"} <= set(rates.condition)
    log = (families_run / "logs/category_steering/fam-l3.log").read_text()
    assert "pinned to their clean values" in log
    # categories.c_by_condition: the common clamp at its own c, the others at steering.c
    c = rates.set_index("condition").c
    assert (c["common"] == -4).all() and (c[c.index.isin(["all", "specific"])] != -4).all()
    assert c["base"].isna().all()


def test_features_were_selected_through_each_family_s_saes(families_run):
    for model in MODELS:
        feats = pd.read_parquet(families_run / f"results/features/{model}/bundled/la_ig.parquet")
        assert len(feats) and set(feats.layer) <= set(LAYERS)
