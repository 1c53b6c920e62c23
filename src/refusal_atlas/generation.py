"""Batched greedy generation with a KV cache, stopped at the model's end-of-turn token."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .interventions import Intervention
from .modeling import encode_chat, end_of_turn_ids


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so left padding wastes little compute."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def chat_batches(
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    batch_size: int,
    system_prompt: str | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """``(indices, left-padded chat batch)`` over ``instructions``, grouped by token length."""
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in instructions]
    for idx in length_sorted_batches(lengths, batch_size):
        yield idx, encode_chat(tokenizer, [instructions[i] for i in idx], system_prompt, device)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    intervention: Intervention | None = None,
    system_prompt: str | None = None,
    desc: str = "generate",
    prompt_ids: Sequence[str] | None = None,
) -> list[str]:
    """Greedy completions of ``instructions`` in their input order.

    ``prompt_ids`` name the prompts for per-prompt interventions (local feature sets).
    """
    intervention = intervention or Intervention()
    stop = end_of_turn_ids(tokenizer)
    out: list[str | None] = [None] * len(instructions)
    device = next(model.parameters()).device
    with intervention.applied(model), tqdm(total=len(instructions), desc=desc, unit="prompt") as bar:
        for idx, enc in chat_batches(tokenizer, instructions, batch_size, system_prompt, device):
            rows = intervention.rows([prompt_ids[i] for i in idx]) if prompt_ids is not None else nullcontext()
            with rows:
                seqs = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    eos_token_id=stop,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = seqs[:, enc["input_ids"].shape[1] :]
            for i, row in zip(idx, new):
                out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
            bar.update(len(idx))
    return out  # type: ignore[return-value]
