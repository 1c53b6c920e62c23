"""Compute nodes without internet: what `snakemake prefetch` fetches for a config, and jobs that
find their hub artefacts in a cache laid out as the hub lays it, with the hub offline."""

import os
import shutil
import subprocess
import sys

import yaml
from conftest import ROOT
from snakemake.utils import validate

from refusal_atlas.cluster.prefetch import MODEL_FILES, hub_artifacts

SCHEMA = str(ROOT / "workflow/schemas/config.schema.yaml")


def config(name):
    cfg = yaml.safe_load((ROOT / f"config/{name}.yaml").read_text())
    validate(cfg, SCHEMA)
    return cfg


def test_the_paper_config_prefetches_both_models_their_sae_folders_and_the_classifier():
    arts = {a.what: a for a in hub_artifacts(config("paper"))}
    assert set(arts) == {"models.gemma-2-2b-it", "models.llama-3.1-8b-instruct", "models.gemma-2-2b-it.sae",
                         "models.llama-3.1-8b-instruct.sae", "judges.harmbench"}
    assert arts["models.gemma-2-2b-it"].repo_id == "google/gemma-2-2b-it"
    assert arts["models.gemma-2-2b-it"].patterns == MODEL_FILES
    gemma_sae = arts["models.gemma-2-2b-it.sae"]
    # one repository, only the folders of the 26 configured layers (the release holds hundreds)
    assert gemma_sae.repo_id == "google/gemma-scope-2b-pt-res" and len(gemma_sae.subfolders) == 26
    assert gemma_sae.subfolders[15].startswith("layer_15/width_65k/average_l0_")
    assert all(p == f"{f}/*" for p, f in zip(gemma_sae.patterns, gemma_sae.subfolders))
    llama_sae = arts["models.llama-3.1-8b-instruct.sae"]
    assert llama_sae.repo_id == "fnlp/Llama3_1-8B-Base-LXR-8x" and len(llama_sae.subfolders) == 32
    assert arts["judges.harmbench"].repo_id == "cais/HarmBench-Llama-2-13b-cls"


def test_the_reference_config_prefetches_the_gate_s_own_sae_folder_too():
    arts = {a.what: a for a in hub_artifacts(config("paper-reference"))}
    gate = arts["models.gemma-2-2b-it.sae.gate"]
    assert gate.repo_id == "google/gemma-scope-2b-pt-res" and gate.subfolders == ("layer_3/width_16k/average_l0_142",)
    assert "models.llama-3.1-8b-instruct.sae.gate" not in arts
    # the circuits' attention and MLP SAEs (Marks et al.'s submodules), only where they are read
    att = arts["models.gemma-2-2b-it.sae.submodules.attn"]
    assert att.repo_id == "google/gemma-scope-2b-pt-att" and len(att.subfolders) == 26
    assert att.subfolders[0].startswith("layer_0/width_16k/average_l0_")
    assert arts["models.llama-3.1-8b-instruct.sae.submodules.mlp"].repo_id == "fnlp/Llama3_1-8B-Base-LXM-8x"
    assert not any(".submodules." in a.what for a in hub_artifacts(config("paper")))


def test_the_embedded_default_needs_nothing_from_the_hub():
    assert hub_artifacts(config("config")) == []


def _hub_cache(root, repo_id, files_from):
    """A Hugging Face cache holding ``files_from``'s files as one snapshot of ``repo_id``."""
    commit = "1" * 40
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text(commit)
    shutil.copytree(files_from, repo / "snapshots" / commit)


def _offline(code, *args, cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)


PREPARE = ("import sys; from refusal_atlas.lm.sources import prepare_model\n"
           "prepare_model({'source': 'hub', 'hub_id': sys.argv[1], 'revision': None, 'dtype': 'float32'}, sys.argv[2])")


def test_prepare_model_loads_a_hub_model_from_the_cache_with_the_hub_offline(tiny_model_dir, tmp_path):
    _hub_cache(tmp_path / "hub", "org/tiny-chat", tiny_model_dir)
    res = _offline(PREPARE, "org/tiny-chat", tmp_path / "out", cache=tmp_path / "hub")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "out/config.json").is_file() and (tmp_path / "out/provenance.json").is_file()


def test_an_artefact_missing_from_the_offline_cache_names_itself_and_the_prefetch_target(tmp_path):
    (tmp_path / "hub").mkdir()
    res = _offline(PREPARE, "org/absent", tmp_path / "out", cache=tmp_path / "hub")
    assert res.returncode != 0 and "ModelSourceError: cannot load 'org/absent': prepare_model: org/absent is not in the Hugging Face cache" \
        in res.stderr and "snakemake prefetch" in res.stderr
    assert not (tmp_path / "out").exists()
    sae = ("from refusal_atlas.saes.loading import load_pretrained_sae\n"
           "load_pretrained_sae('gemma-scope-2b-pt-res-canonical', 'layer_3/width_16k/canonical')")
    res = _offline(sae, cache=tmp_path / "hub")
    assert "NotCachedError: SAE gemma-scope-2b-pt-res-canonical/layer_3/width_16k/canonical: google/gemma-scope-2b-pt-res" \
        in res.stderr and "snakemake prefetch" in res.stderr
