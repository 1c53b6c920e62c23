"""Residual-stream activations at the last prompt tokens, on every layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_atlas.lm.generation import chat_batches
from refusal_atlas.lm.modeling import block_hidden, decoder_layers, position_ids_from_mask


@torch.no_grad()
def final_positions_resid_post(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    n_positions: int,
    *,
    batch_size: int = 16,
    system_prompt: str | None = None,
    desc: str = "activations",
) -> torch.Tensor:
    """``[n_prompts, n_positions, n_layers, d_model]`` float32 resid_post at each prompt's last
    ``n_positions`` tokens, oldest first (with ``modeling.post_instruction_length``: Arditi et al.'s
    post-instruction positions).

    Hooks on the decoder blocks read resid_post directly: HF's ``hidden_states[-1]`` has the
    final norm applied, so it is not the last block's residual stream. Prompts are left-padded,
    so the last positions are each prompt's own whatever its length.
    """
    layers = decoder_layers(model)
    n_layers = len(layers)
    d_model = model.config.hidden_size
    out = torch.empty(len(instructions), n_positions, n_layers, d_model, dtype=torch.float32)
    grabbed: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_m, _i, output):
            h = block_hidden(output)
            grabbed[layer] = h[:, -n_positions:, :].detach().float().cpu()

        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        with tqdm(total=len(instructions), desc=desc, unit="prompt") as bar:
            for idx, enc in chat_batches(tokenizer, instructions, batch_size, system_prompt, device):
                if enc["attention_mask"].sum(1).min() < n_positions:
                    raise ValueError(f"a prompt is shorter than the {n_positions} positions asked for")
                grabbed.clear()
                # logits_to_keep=1: the unembedding of every position (a fifth of SmolLM2's forward
                # FLOPs) is not needed here
                model(**enc, position_ids=position_ids_from_mask(enc["attention_mask"]), use_cache=False,
                      logits_to_keep=1)
                if len(grabbed) != n_layers:
                    raise RuntimeError(f"only {len(grabbed)} of {n_layers} layer hooks fired")
                out[idx] = torch.stack([grabbed[i] for i in range(n_layers)], dim=2)
                bar.update(len(idx))
    finally:
        for h in handles:
            h.remove()
    return out


def last_token_resid_post(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    *,
    batch_size: int = 16,
    system_prompt: str | None = None,
    desc: str = "activations",
) -> torch.Tensor:
    """``[n_prompts, n_layers, d_model]`` float32 resid_post at the last prompt token."""
    return final_positions_resid_post(model, tokenizer, instructions, 1, batch_size=batch_size,
                                      system_prompt=system_prompt, desc=desc)[:, 0]
