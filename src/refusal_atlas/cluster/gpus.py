"""How many GPUs each GPU-heavy rule asks for, computed per model from the config.

A cluster user should not hand-tune ``--gpus`` per rule: a rule that holds gemma-2-2b fits one
80 GB GPU, while LA-IG gradients through 32 Llama Scope SAEs of an 8B model do not. Each stage
gets a peak-memory estimate from the model's shape (``models.<m>.shape``) and its knobs, and asks
for ``ceil(peak / usable GPU memory)`` GPUs. LA-IG uses the term-by-term model of
:mod:`refusal_atlas.cluster.memory`; the other stages count weights, resident SAEs, optimizer state and
the KV cache. Pure Python: the DAG imports it while planning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from refusal_atlas.cluster.memory import GiB, ModelShape, la_ig_memory, sae_param_count

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

#: Rules that run a model (or a big judge) and so may need GPUs; every other rule is CPU-only.
GPU_STAGES = (
    "base_refusal",
    "refusal_tune",
    "organism_card",
    "cache_activations",
    "refusal_direction",
    "sae_corpus",
    "train_sae",
    "sae_quality",
    "feature_attribution",
    "steering_search",
    "steer_generate",
    "capabilities",
    "adversarial_responses",
    "jailbreak_mechanism",
    "guardrail_select",
    "guardrail_eval",
    "refusal_guardrail",
    "feature_dashboards",
    "category_features",
    "category_steering",
    "circuits",
)


def model_shape(spec: Mapping) -> ModelShape | None:
    """The model's shape from ``models.<m>.shape``, or None where the config gives none."""
    shape = spec.get("shape")
    return ModelShape(**shape) if shape else None


def _saes_bytes(shape: ModelShape, sae: Mapping, n_layers: int, dtype_bytes: int) -> int:
    return n_layers * sae_param_count(shape.d_model, sae["d_sae"]) * dtype_bytes


def _kv_cache_bytes(shape: ModelShape, batch: int, seq_len: int, dtype_bytes: int) -> int:
    # keys and values at full width: an upper bound for grouped-query attention
    return 2 * shape.n_layers * batch * seq_len * shape.d_model * dtype_bytes


def stage_memory(stage: str, spec: Mapping, config: Mapping) -> float:
    """Estimated peak GPU bytes of one job of ``stage`` for the model ``spec``.

    Raises ValueError for a stage that is not in :data:`GPU_STAGES` or a spec without a shape.
    """
    shape = model_shape(spec)
    if shape is None:
        raise ValueError("the model has no 'shape' in the config; its GPU memory cannot be estimated")
    b = DTYPE_BYTES[spec["dtype"]]
    sae = spec["sae"]
    n_sae = len(sae["layers"])
    seq = config["cluster"]["seq_len"]
    weights = shape.n_params * b
    if stage == "feature_attribution":
        return la_ig_memory(
            shape, d_sae=sae["d_sae"], n_sae_layers=n_sae, la_bz=config["features"]["la_bz"],
            seq_len=seq, dtype_bytes=b,
        )["peak"]
    if stage == "refusal_tune":
        org = config["organism"]
        trained = shape.n_params * max(shape.n_layers - org["train_from_layer"], 0) / shape.n_layers
        # fp32 AdamW: gradient + two moments per trained parameter; activations of one batch
        acts = shape.n_layers * org["batch_size"] * seq * (8 * shape.d_model + 3 * shape.d_mlp) * 2
        return weights + 12 * trained + acts
    if stage == "train_sae":
        # one SAE with fp32 AdamW state, and one batch of activations and latents
        batch = sae["train_batch_size"]
        return 4 * _saes_bytes(shape, sae, 1, 4) + batch * (shape.d_model + sae["d_sae"]) * 4 * 3
    if stage in ("steer_generate", "steering_search", "capabilities"):
        batch = config["evaluation"]["batch_size"]
        return weights + _saes_bytes(shape, sae, n_sae, b) + _kv_cache_bytes(shape, batch, seq, b)
    if stage in ("guardrail_select", "guardrail_eval"):
        # one SAE at a time in use, and a teacher-forced batch's logits
        gr = config["guardrails"]["unlearning"]
        return (weights + _saes_bytes(shape, sae, n_sae, b)
                + gr["batch_size"] * gr["max_tokens"] * (shape.vocab * 4 + sae["d_sae"] * 4))
    if stage == "refusal_guardrail":
        batch = config["guardrails"]["refusal"]["batch_size"]
        return weights + _saes_bytes(shape, sae, n_sae, b) + _kv_cache_bytes(shape, batch, seq, b)
    if stage == "adversarial_responses":
        batch = config["probes"]["batch_size"]
        return weights + _kv_cache_bytes(shape, batch, seq, b)
    if stage == "category_features":
        cat = config["categories"]
        return la_ig_memory(
            shape, d_sae=sae["d_sae"], n_sae_layers=n_sae, la_bz=cat["la_bz"] or config["features"]["la_bz"],
            seq_len=seq, dtype_bytes=b,
        )["peak"]
    if stage == "category_steering":
        batch = config["categories"]["batch_size"]
        hb = config["judges"]["harmbench"]
        # the HarmBench classifier judges in-process there (judges.harmbench.stages), in bf16
        judge = 2 * hb["n_params"] if "harmbench" in config["evaluation"]["judges"] and stage in hb["stages"] else 0
        return weights + _saes_bytes(shape, sae, n_sae, b) + _kv_cache_bytes(shape, batch, seq, b) + judge
    if stage == "circuits":
        # IG over every SAE site at once: as LA-IG, with the circuits' batch for la_bz; the attention
        # and MLP SAEs counted at the resid SAEs' width (an upper bound for Gemma Scope's 16k ones)
        cc = config["categories"]["circuits"]
        return la_ig_memory(
            shape, d_sae=sae["d_sae"], n_sae_layers=n_sae * len(cc["submodules"]), la_bz=cc["batch_size"],
            seq_len=seq, dtype_bytes=b,
        )["peak"]
    if stage == "feature_dashboards":
        # every SAE resident; one batch's resid_post at the selected features' layers and their latents
        batch = config["dashboards"]["batch_size"]
        return (weights + _saes_bytes(shape, sae, n_sae, b) + _kv_cache_bytes(shape, batch, seq, b)
                + batch * seq * (shape.d_model * n_sae * b + sae["d_sae"] * 4))
    if stage == "jailbreak_mechanism":
        # every SAE resident, one batch's resid_post at every SAE layer, one layer's latents at a time
        batch = config["probes"]["batch_size"]
        return weights + _saes_bytes(shape, sae, n_sae, b) + batch * seq * (shape.d_model * n_sae * b + sae["d_sae"] * 4)
    if stage == "sae_quality":
        return weights + _saes_bytes(shape, sae, 1, b) + _kv_cache_bytes(shape, 16, seq, b)
    if stage in ("base_refusal", "organism_card", "refusal_direction", "cache_activations", "sae_corpus"):
        return weights + _kv_cache_bytes(shape, 64, seq, b)
    raise ValueError(f"{stage!r} is not a GPU stage (one of {', '.join(GPU_STAGES)})")


def uses_gpu(spec: Mapping) -> bool:
    return not str(spec["device"]).startswith("cpu")


def stage_gpus(stage: str, spec: Mapping, config: Mapping) -> int:
    """GPUs one job of ``stage`` asks for: ``models.<m>.gpus`` when set, 0 on a CPU model, else
    the estimated peak over the usable memory of one GPU (``cluster.gpu_mem_gb`` ×
    ``cluster.usable_fraction``), at least 1. A model without a shape gets 1.
    """
    if stage not in GPU_STAGES:
        return 0
    if spec.get("gpus") is not None:
        return spec["gpus"]
    if not uses_gpu(spec):
        return 0
    if model_shape(spec) is None:
        return 1
    cluster = config["cluster"]
    usable = cluster["gpu_mem_gb"] * GiB * cluster["usable_fraction"]
    return max(1, math.ceil(stage_memory(stage, spec, config) / usable))
