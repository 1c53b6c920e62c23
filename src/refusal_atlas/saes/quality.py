"""SAE quality: reconstruction, sparsity and the CE loss recovered when the SAE is spliced in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as nnf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_atlas.lm.generation import chat_batches
from refusal_atlas.lm.interventions import _replace_output
from refusal_atlas.lm.modeling import decoder_layers, position_ids_from_mask
from refusal_atlas.saes.corpus import token_mask

if TYPE_CHECKING:  # SAELens takes seconds to import; model-only jobs never need it
    from sae_lens import SAE


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
            ce = nnf.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
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
