"""Sparse autoencoders on the residual stream: token activations, TopK training, quality.

SAEs are SAELens objects throughout, saved as SAELens directories (``cfg.json`` +
``sae_weights.safetensors``) that ``SAE.load_from_disk`` reads. Training uses SAELens's
``SAETrainer`` on cached activations (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders": TopK activation, Eq. 3, with the AuxK loss for dead latents).
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .generation import chat_batches
from .interventions import _replace_output
from .modeling import block_hidden, decoder_layers, position_ids_from_mask, special_token_mask

if TYPE_CHECKING:  # SAELens takes seconds to import; model-only jobs never need it
    from sae_lens import SAE

log = logging.getLogger(__name__)

HOOK_TEMPLATE = "blocks.{layer}.hook_resid_post"


def hook_name(layer: int) -> str:
    return HOOK_TEMPLATE.format(layer=layer)


def hook_layer(sae: SAE) -> int:
    """The decoder block whose output (resid_post) ``sae`` reads; anything else is refused."""
    name = sae.cfg.metadata.hook_name or ""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", name)
    if m is None:
        raise ValueError(f"refusal-atlas hooks SAEs on resid_post; this SAE reads {name!r}")
    return int(m.group(1))


def token_mask(tokenizer: PreTrainedTokenizerBase, enc: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Real, non-special positions. BOS and chat markers hold massive activations (norm ~24k
    against a median ~174 in SmolLM2) that would dominate an SAE's loss (ARCHITECTURE.md)."""
    return enc["attention_mask"].bool() & ~special_token_mask(tokenizer, enc["input_ids"])


@torch.no_grad()
def token_resid_post(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
    system_prompt: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[int, torch.Tensor]:
    """``{layer: [n_tokens, d_model]}`` resid_post at every non-special token, one pass for all layers.

    Rows are in prompt order then position order, the same rows in every layer.
    """
    blocks = decoder_layers(model)
    rows: dict[int, list[torch.Tensor | None]] = {layer: [None] * len(instructions) for layer in layers}

    def make_hook(layer: int):
        def hook(_m, _i, output):
            grabbed[layer] = block_hidden(output).detach()

        return hook

    grabbed: dict[int, torch.Tensor] = {}
    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    device = next(model.parameters()).device
    try:
        with tqdm(total=len(instructions), desc="corpus activations", unit="seq") as bar:
            for idx, enc in chat_batches(tokenizer, instructions, batch_size, system_prompt, device):
                grabbed.clear()
                # logits_to_keep=1: the unembedding of every position is not needed here
                model(**enc, position_ids=position_ids_from_mask(enc["attention_mask"]), use_cache=False,
                      logits_to_keep=1)
                if len(grabbed) != len(layers):
                    raise RuntimeError(f"only {len(grabbed)} of {len(layers)} layer hooks fired")
                keep = token_mask(tokenizer, enc).cpu()
                for layer in layers:
                    h = grabbed[layer].to(dtype).cpu()
                    for row, i in enumerate(idx):
                        rows[layer][i] = h[row][keep[row]]
                bar.update(len(idx))
    finally:
        for h in handles:
            h.remove()
    return {layer: torch.cat(rows[layer]) for layer in layers}


@dataclass
class TopKTrainConfig:
    """TopK SAE training (Gao et al. 2024); ``training_tokens`` may exceed the cache (epochs)."""

    d_sae: int = 4096
    k: int = 32
    lr: float = 4e-4
    batch_size: int = 4096
    training_tokens: int = 1_000_000
    warmup_fraction: float = 0.02
    decay_fraction: float = 0.2
    aux_loss_coefficient: float = 1.0
    dead_feature_window: int = 200
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"


def shuffled_batches(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless float32 batches, reshuffled every epoch with a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    if n < batch_size:
        raise ValueError(f"{n} cached tokens are fewer than one training batch ({batch_size})")
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield acts[perm[start : start + batch_size]].float()


def train_topk_sae(acts: torch.Tensor, cfg: TopKTrainConfig, metadata: Mapping) -> SAE:
    """Train a TopK SAE on ``[n_tokens, d_in]`` activations with SAELens's trainer.

    The returned SAE is the inference version (``TopKSAE``) in ``cfg.dtype``, with ``metadata``
    (hook name, model, corpus) recorded in its config.
    """
    torch.manual_seed(cfg.seed)
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae_cfg = TopKTrainingSAEConfig(
        d_in=acts.shape[1],
        d_sae=cfg.d_sae,
        k=cfg.k,
        aux_loss_coefficient=cfg.aux_loss_coefficient,
        rescale_acts_by_decoder_norm=True,
        # A single scale factor learnt from the data, folded into the weights after training.
        normalize_activations="expected_average_only_in",
        device=cfg.device,
        dtype="float32",
    )
    for key, value in metadata.items():
        setattr(sae_cfg.metadata, key, value)
    sae = TopKTrainingSAE(sae_cfg)
    steps = max(1, cfg.training_tokens // cfg.batch_size)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,
        lr_scheduler_name="constant",
        lr_warm_up_steps=int(cfg.warmup_fraction * steps),
        lr_decay_steps=int(cfg.decay_fraction * steps),
        adam_beta1=0.9,
        adam_beta2=0.999,
        device=cfg.device,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=max(10, steps // 10),
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=min(100, max(1, acts.shape[0] // cfg.batch_size)),
    )
    trainer = SAETrainer(trainer_cfg, sae, shuffled_batches(acts, cfg.batch_size, cfg.seed))
    trained = trainer.fit()
    # The inference format is what the workflow saves, so round-trip through it.
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(tmp)
        return load_sae(tmp, device=cfg.device, dtype=cfg.dtype)


def load_sae(path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None) -> SAE:
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(path), device=str(device), dtype=dtype)
    sae.requires_grad_(False)
    return sae.eval()


def load_pretrained_sae(release: str, sae_id: str, device: str = "cpu", dtype: str = "float32") -> SAE:
    """An SAE from a SAELens release (Gemma Scope, Llama Scope...), with a clear error if unknown."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise ValueError(f"unknown SAELens release {release!r}; see sae_lens's pretrained_saes.yaml")
    if sae_id not in directory[release].saes_map:
        sample = sorted(directory[release].saes_map)[:5]
        raise ValueError(f"release {release!r} has no SAE {sae_id!r} (e.g. {sample})")
    from sae_lens import SAE

    return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)


# ---------------------------------------------------------------------------- quality
@dataclass
class SAEQuality:
    """Held-out quality of one SAE; CE recovered as in Bricken et al. 2023 / SAELens evals."""

    layer: int
    n_tokens: int
    explained_variance: float
    mse: float
    l0: float
    dead_fraction: float
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_recovered: float
    n_ce_tokens: int


@torch.no_grad()
def reconstruction_stats(sae: SAE, acts: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Explained variance 1 - Σ|x-x̂|² / Σ|x-x̄|², MSE, mean L0, fraction of never-firing latents."""
    dtype = next(sae.parameters()).dtype
    device = next(sae.parameters()).device
    mean = acts.float().mean(0)
    sse = sst = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device)
    for start in range(0, acts.shape[0], batch_size):
        x = acts[start : start + batch_size].to(device=device, dtype=dtype)
        f = sae.encode(x)
        x_hat = sae.decode(f).float()
        sse += (x.float() - x_hat).pow(2).sum().item()
        sst += (x.float() - mean.to(device)).pow(2).sum().item()
        l0 += (f != 0).sum().item()
        fired |= (f != 0).any(0)
    n = acts.shape[0]
    return {
        "explained_variance": 1.0 - sse / sst,
        "mse": sse / (n * acts.shape[1]),
        "l0": l0 / n,
        "dead_fraction": 1.0 - fired.float().mean().item(),
    }


def splice(sae: SAE, mode: str, mask: torch.Tensor):
    """A hook that replaces the ``mask`` positions by the SAE's reconstruction, or by zero."""
    keep = mask.unsqueeze(-1)

    def fn(h: torch.Tensor) -> torch.Tensor:
        if mode == "zero":
            new = torch.zeros_like(h)
        else:
            new = sae.decode(sae.encode(h.to(next(sae.parameters()).dtype))).to(h.dtype)
        return torch.where(keep, new, h)

    return _replace_output(fn)


@torch.no_grad()
def ce_losses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sae: SAE,
    layer: int,
    instructions: Sequence[str],
    *,
    batch_size: int = 16,
    system_prompt: str | None = None,
) -> tuple[dict[str, float], int]:
    """Mean next-token CE (per real target token) clean, with the SAE spliced in, and zero-ablated.

    Splicing and ablation touch non-special positions only, the positions the SAE was trained on.
    """
    block = decoder_layers(model)[layer]
    device = next(model.parameters()).device
    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    n_tok = 0
    for _idx, enc in chat_batches(tokenizer, instructions, batch_size, system_prompt, device):
        mask = enc["attention_mask"].bool()
        target = mask[:, 1:] & mask[:, :-1]
        labels = enc["input_ids"][:, 1:]
        keep = token_mask(tokenizer, enc)
        pos = position_ids_from_mask(enc["attention_mask"])
        for mode in totals:
            handle = block.register_forward_hook(splice(sae, mode, keep)) if mode != "clean" else None
            try:
                logits = model(**enc, position_ids=pos, use_cache=False).logits[:, :-1].float()
            finally:
                if handle is not None:
                    handle.remove()
            ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            totals[mode] += ce[target].sum().item()
        n_tok += int(target.sum())
    return {k: v / n_tok for k, v in totals.items()}, n_tok


def quality(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sae: SAE,
    layer: int,
    heldout_acts: torch.Tensor,
    heldout_instructions: Sequence[str],
    *,
    batch_size: int = 16,
    system_prompt: str | None = None,
) -> SAEQuality:
    stats = reconstruction_stats(sae, heldout_acts)
    ce, n_ce = ce_losses(model, tokenizer, sae, layer, heldout_instructions, batch_size=batch_size,
                         system_prompt=system_prompt)
    denom = ce["zero"] - ce["clean"]
    recovered = (ce["zero"] - ce["spliced"]) / denom if denom > 0 else float("nan")
    return SAEQuality(
        layer=layer, n_tokens=int(heldout_acts.shape[0]), ce_clean=ce["clean"], ce_spliced=ce["spliced"],
        ce_zero=ce["zero"], ce_recovered=recovered, n_ce_tokens=n_ce, **stats,
    )
