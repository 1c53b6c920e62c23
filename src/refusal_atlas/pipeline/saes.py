"""Stages of workflow/rules/saes.smk: the SAE corpus, trained or pretrained SAEs, their quality."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from refusal_atlas.core.io import atomic_path, write_json, write_parquet, write_safetensors, write_table
from refusal_atlas.data import prompts

log = logging.getLogger("refusal_atlas")


def corpus_splits(n_items: int, cfg: Mapping) -> dict[str, np.ndarray]:
    """The corpus's held-out and training sequences (a seeded shuffle), the same for every pass."""
    order = np.random.default_rng(cfg["seed"]).permutation(n_items)
    n_ho = min(cfg["heldout_sequences"], n_items // 2)
    return {"heldout": order[:n_ho], "train": order[n_ho : n_ho + cfg["max_sequences"]]}


def sae_corpus(*, model_dir: str, spec: Mapping, dataset: str, cfg: Mapping, layers: Sequence[int], heldout_only: bool,
               acts_out: str, index_out: str) -> None:
    """One activation pass over the corpus for every SAE layer; held-out sequences kept apart."""
    from refusal_atlas.lm.modeling import autocast
    from refusal_atlas.pipeline.openers import check_layers, open_model
    from refusal_atlas.saes import corpus, loading

    items = prompts.load_instructions(Path(dataset))
    splits = corpus_splits(len(items), cfg)
    if heldout_only:
        del splits["train"]
    model, tok, system_prompt = open_model(model_dir, spec)
    check_layers(layers, model.config.num_hidden_layers, "sae.layers")
    tensors, rows = {}, []
    for split, idx in splits.items():
        texts = [items[i]["instruction"] for i in idx]
        with autocast(model, cfg["autocast_dtype"]):
            acts = corpus.token_resid_post(model, tok, texts, layers, batch_size=cfg["batch_size"],
                                         system_prompt=system_prompt)
        for layer, a in acts.items():
            tensors[f"layer_{layer}.{split}"] = a
        rows += [{"instruction": t, "split": split} for t in texts]
        log.info("%s: %d sequences, %d tokens", split, len(texts), next(iter(acts.values())).shape[0])
    meta = {"hook": loading.HOOK_TEMPLATE, "positions": "non-special tokens", "dataset": dataset}
    write_safetensors(tensors, acts_out, metadata=meta)
    write_parquet(pd.DataFrame(rows), index_out)


def submodule_corpus(*, model_dir: str, spec: Mapping, dataset: str, cfg: Mapping, layers: Sequence[int],
                     submodule: str, acts_out: str) -> None:
    """The sae_corpus's training sequences again, read at each layer's ``submodule`` output (the
    attention's or the MLP's, TransformerLens's hook_attn_out / hook_mlp_out), for the circuits'
    trained submodule SAEs. A pass of its own: the resid SAEs' corpus stays as it was."""
    from refusal_atlas.lm.modeling import autocast
    from refusal_atlas.pipeline.openers import check_layers, open_model
    from refusal_atlas.saes import corpus

    items = prompts.load_instructions(Path(dataset))
    texts = [items[i]["instruction"] for i in corpus_splits(len(items), cfg)["train"]]
    model, tok, system_prompt = open_model(model_dir, spec)
    check_layers(layers, model.config.num_hidden_layers, "sae.layers")
    hooks = {submodule_hook(layer, submodule): layer for layer in layers}
    with autocast(model, cfg["autocast_dtype"]):
        acts = corpus.token_resid_post(model, tok, texts, list(hooks), batch_size=cfg["batch_size"],
                                       system_prompt=system_prompt)
    log.info("%s: %d sequences, %d tokens per layer", submodule, len(texts), next(iter(acts.values())).shape[0])
    write_safetensors({f"{submodule}_{hooks[h]}.train": a for h, a in acts.items()}, acts_out,
                      metadata={"hook": submodule_hook("{layer}", submodule), "positions": "non-special tokens",
                                "dataset": dataset})


def submodule_hook(layer, submodule: str) -> str:
    """Where a trained submodule SAE reads (the sublayer's output as it joins the stream)."""
    return f"blocks.{layer}.hook_{submodule}_out"


def submodule_sae(*, acts_path: str | None, layer: int, submodule: str, model_name: str, spec: Mapping,
                  cfg: Mapping, output_dir: str) -> None:
    """One SAE on ``submodule``'s output at ``layer``: a SAELens release's (``cfg`` has
    ``release``/``sae_id``), or TopK trained like the resid SAEs on :func:`submodule_corpus`."""
    if acts_path is None:
        pretrained_sae(spec=spec, cfg=cfg, layer=layer, model_name=model_name, output_dir=output_dir,
                       submodule=submodule)
        return
    _train(acts_path, f"{submodule}_{layer}", submodule_hook(layer, submodule), model_name, spec, cfg, output_dir)


def train_sae(*, acts_path: str, layer: int, model_name: str, spec: Mapping, cfg: Mapping, output_dir: str) -> None:
    from refusal_atlas.saes import loading

    _train(acts_path, f"layer_{layer}", loading.hook_name(layer), model_name, spec, cfg, output_dir)


def _train(acts_path: str, key: str, hook: str, model_name: str, spec: Mapping, cfg: Mapping,
           output_dir: str) -> None:
    from safetensors import safe_open

    from refusal_atlas.lm.modeling import resolve_device
    from refusal_atlas.saes import training

    with safe_open(acts_path, "pt") as fh:
        acts = fh.get_tensor(f"{key}.train")
    train_cfg = training.TopKTrainConfig(
        d_sae=cfg["d_sae"], k=cfg["k"], lr=cfg["lr"], batch_size=cfg["train_batch_size"],
        training_tokens=cfg["training_tokens"], dead_feature_window=cfg["dead_feature_window"], seed=cfg["seed"],
        device=str(resolve_device(spec["device"])), dtype=spec["dtype"],
    )
    start = time.perf_counter()
    sae = training.train_topk_sae(acts, train_cfg, {
        "hook_name": hook, "model_name": model_name, "exclude_special_tokens": True,
        "n_cached_tokens": int(acts.shape[0]),
    })
    sae.cfg.metadata.train_seconds = round(time.perf_counter() - start, 1)
    log.info("trained %s on %d cached tokens in %.0f s", hook, acts.shape[0], sae.cfg.metadata.train_seconds)
    with atomic_path(output_dir, is_dir=True) as tmp:
        sae.save_model(tmp)


def pretrained_sae(*, spec: Mapping, cfg: Mapping, layer: int, model_name: str, output_dir: str,
                   submodule: str = "resid") -> None:
    from refusal_atlas.saes import loading

    sae_id = cfg["sae_id"].format(layer=layer)
    sae = loading.load_pretrained_sae(cfg["release"], sae_id, dtype=spec["dtype"])
    loading.check_fits(sae, layer, cfg["d_model"], f"{cfg['release']}/{sae_id}", model_name, submodule)
    with atomic_path(output_dir, is_dir=True) as tmp:
        sae.save_model(tmp)


def gate_sae(*, spec: Mapping, cfg: Mapping, model_name: str, output_dir: str) -> None:
    """The unlearning guardrail's own SAE (``models.<m>.sae.gate``) at ``cfg["layer"]``."""
    pretrained_sae(spec=spec, cfg=cfg, layer=cfg["layer"], model_name=model_name, output_dir=output_dir)


def local_sae(*, sae_dir: str, spec: Mapping, d_model: int | None, layer: int, model_name: str,
              output_dir: str) -> None:
    from refusal_atlas.saes import loading

    if not (Path(sae_dir) / "cfg.json").is_file():
        raise FileNotFoundError(f"{sae_dir} is not a SAELens SAE directory (no cfg.json); models.{model_name}.sae.path "
                                "must name directories that SAE.save_model wrote")
    sae = loading.load_sae(sae_dir, dtype=spec["dtype"])
    loading.check_fits(sae, layer, d_model, sae_dir, model_name)
    log.info("%s: %s SAE, d_in %d, d_sae %d", sae_dir, sae.cfg.architecture(), sae.cfg.d_in, sae.cfg.d_sae)
    with atomic_path(output_dir, is_dir=True) as tmp:
        sae.save_model(tmp)


def sae_quality(*, model_dir: str, spec: Mapping, sae_dir: str, layer: int, acts_path: str, index_path: str,
                batch_size: int, output: str) -> None:
    from safetensors import safe_open

    from refusal_atlas.lm.modeling import layer_device
    from refusal_atlas.pipeline.openers import open_model
    from refusal_atlas.saes import loading, quality

    model, tok, system_prompt = open_model(model_dir, spec)
    sae = loading.load_sae(sae_dir, device=layer_device(model, layer), dtype=spec["dtype"])
    with safe_open(acts_path, "pt") as fh:
        heldout = fh.get_tensor(f"layer_{layer}.heldout")
    index = pd.read_parquet(index_path)
    texts = list(index[index.split == "heldout"].instruction)
    q = quality.quality(model, tok, sae, layer, heldout, texts, batch_size=batch_size, system_prompt=system_prompt)
    log.info("%s", q)
    write_json({**asdict(q), "d_sae": sae.cfg.d_sae, "train_seconds": sae.cfg.metadata.train_seconds,
                "sae": sae_dir}, output)


# ---------------------------------------------------------------------------- SAE quality
def sae_quality_table(*, files: Sequence[str], model: str, targets: Mapping[str, float], output: str) -> None:
    df = pd.DataFrame([json.loads(Path(p).read_text()) for p in files]).assign(model=model)
    df["meets_targets"] = (df.explained_variance >= targets["explained_variance_min"]) & (
        df.ce_recovered >= targets["ce_recovered_min"])
    write_table(df, output)
