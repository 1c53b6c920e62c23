"""Sparse autoencoders on the residual stream: token activations, TopK training, quality.

SAEs are SAELens objects throughout, saved as SAELens directories (``cfg.json`` +
``sae_weights.safetensors``) that ``SAE.load_from_disk`` reads. Training uses SAELens's
``SAETrainer`` on cached activations (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders": TopK activation, Eq. 3, with the AuxK loss for dead latents).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from refusal_atlas.saes.loading import load_sae

if TYPE_CHECKING:  # SAELens takes seconds to import; model-only jobs never need it
    from sae_lens import SAE

log = logging.getLogger(__name__)


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














