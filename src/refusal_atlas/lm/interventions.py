"""Interventions on the residual stream, applied as forward hooks on the HF modules.

Each intervention is a context manager over a model: hooks are attached on entry and always
removed on exit. Hooks act at every position, generated tokens included, because with a KV
cache every decoding step runs the new token through the same modules.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from refusal_atlas.lm.modeling import decoder_layers, embedding_module, module_device


def _replace_output(fn):
    """Wrap ``fn(hidden) -> hidden`` as a forward hook for modules returning a tensor or tuple."""

    def hook(_module: nn.Module, _inputs, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)

    return hook


def project_out(h: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """h - (h . r̂) r̂ (Arditi et al. 2024, Eq. 4: directional ablation)."""
    unit = unit.to(h.dtype)
    # elementwise, not a matmul: under autocast a bf16 matmul would leave ~0.4% of r̂ behind
    return h - (h * unit).sum(-1, keepdim=True) * unit


@dataclass
class Intervention:
    """No intervention: the base model (the "Base" row of Yeo et al. 2025, Table 1)."""

    def handles(self, model: PreTrainedModel) -> list[torch.utils.hooks.RemovableHandle]:
        return []

    @property
    def shares_prefix(self) -> bool:
        """Whether generation may run the prompts' common prefix once, at batch size 1: true where
        the hooks map each position alone, the same way in every row and every forward pass."""
        return True

    @contextmanager
    def rows(self, prompt_ids: Sequence[str]) -> Iterator[None]:
        """Tell a per-prompt intervention which prompts the next batch holds (no-op here)."""
        yield

    @contextmanager
    def applied(self, model: PreTrainedModel) -> Iterator[None]:
        handles = self.handles(model)
        try:
            yield
        finally:
            for h in handles:
                h.remove()


@dataclass
class DirectionalAblation(Intervention):
    """Remove r̂ from the embeddings and from every layer's output at every position ("AS")."""

    direction: torch.Tensor

    def handles(self, model):
        unit = self.direction / self.direction.norm()
        dtype = next(model.parameters()).dtype
        modules = [embedding_module(model), *decoder_layers(model)]
        return [m.register_forward_hook(_project_hook(unit.to(device=module_device(m), dtype=dtype)))
                for m in modules]


def _project_hook(unit: torch.Tensor):
    return _replace_output(lambda h: project_out(h, unit))


@dataclass
class DirectionAddition(Intervention):
    """Add ``coeff * r`` to resid_post of block ``layer`` (Arditi et al. 2024, Eq. 5), where the
    refusal direction ``r[layer]`` was read (``activations.last_token_resid_post``).

    Arditi et al. read and add r at the same point of the stream (their resid_pre); adding it at
    resid_pre of ``layer`` would put it one block before where it was read.
    """

    direction: torch.Tensor
    layer: int
    coeff: float = 1.0

    def handles(self, model):
        target = decoder_layers(model)[self.layer]
        dtype = next(model.parameters()).dtype
        vec = (self.coeff * self.direction).to(device=module_device(target), dtype=dtype)
        return [target.register_forward_hook(_replace_output(lambda h: h + vec))]
