"""Token-level residual-stream activations, the corpus an SAE is trained and scored on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_atlas.lm.generation import chat_batches
from refusal_atlas.lm.modeling import hook_site, hooks_removed, position_ids_from_mask, special_token_mask
from refusal_atlas.saes.loading import hook_name

if TYPE_CHECKING:  # SAELens takes seconds to import; model-only jobs never need it
    pass


def token_mask(tokenizer: PreTrainedTokenizerBase, enc: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Real, non-special positions. BOS and chat markers hold massive activations (norm ~24k
    against a median ~174 in SmolLM2) that would dominate an SAE's loss (ARCHITECTURE.md)."""
    return enc["attention_mask"].bool() & ~special_token_mask(tokenizer, enc["input_ids"])


@torch.no_grad()
def token_resid_post(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    layers: Sequence[int | str],
    *,
    batch_size: int = 16,
    system_prompt: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[int | str, torch.Tensor]:
    """``{layer: [n_tokens, d_model]}`` resid_post at every non-special token, one pass for all layers.
    A ``str`` among ``layers`` is a TransformerLens hook name (lm.modeling.hook_site: an attention
    or MLP output, for the circuits' submodule SAEs), keyed by itself.

    Rows are in prompt order then position order, the same rows in every layer.
    """
    rows: dict[int | str, list[torch.Tensor | None]] = {layer: [None] * len(instructions) for layer in layers}

    def grab(key: int | str):
        return lambda h: grabbed.__setitem__(key, h.detach())

    grabbed: dict[int | str, torch.Tensor] = {}
    handles = [hook_site(model, layer if isinstance(layer, str) else hook_name(layer), grab(layer), replace=False)
               for layer in layers]
    device = next(model.parameters()).device
    with hooks_removed(handles):
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
    return {layer: torch.cat(rows[layer]) for layer in layers}
