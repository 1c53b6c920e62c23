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
    texts, _ = _generate(model, tokenizer, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         intervention=intervention, system_prompt=system_prompt, desc=desc, prompt_ids=prompt_ids,
                         first_logprobs=False)
    return texts


@torch.no_grad()
def generate_with_first_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, instructions: Sequence[str], **kwargs
) -> tuple[list[str], torch.Tensor]:
    """:func:`generate` (same keywords) plus the ``[n, vocab]`` float32 log-probabilities of the
    first new token.

    The prefill's last-position distribution is the one a separate last-token forward pass would
    give, so callers that need both (refusal scores beside judged generations) skip that pass.
    """
    texts, logprobs = _generate(model, tokenizer, instructions, **kwargs, first_logprobs=True)
    assert logprobs is not None
    return texts, logprobs


def _generate(model, tokenizer, instructions, *, max_new_tokens, batch_size=16, intervention=None, system_prompt=None,
              desc="generate", prompt_ids=None, first_logprobs: bool) -> tuple[list[str], torch.Tensor | None]:
    intervention = intervention or Intervention()
    stop = end_of_turn_ids(tokenizer)
    out: list[str | None] = [None] * len(instructions)
    firsts: torch.Tensor | None = None
    device = next(model.parameters()).device
    with intervention.applied(model), tqdm(total=len(instructions), desc=desc, unit="prompt") as bar:
        for idx, enc in chat_batches(tokenizer, instructions, batch_size, system_prompt, device):
            rows = intervention.rows([prompt_ids[i] for i in idx]) if prompt_ids is not None else nullcontext()
            with rows:
                res = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    eos_token_id=stop,
                    pad_token_id=tokenizer.pad_token_id,
                    return_dict_in_generate=True,
                    output_logits=first_logprobs,
                )
            new = res.sequences[:, enc["input_ids"].shape[1] :]
            for i, row in zip(idx, new):
                out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
            if first_logprobs:
                # logits, not scores: scores come after the logits processors
                lp = torch.log_softmax(res.logits[0].float(), -1).cpu()
                if firsts is None:
                    firsts = torch.empty(len(instructions), lp.shape[-1])
                firsts[idx] = lp
            bar.update(len(idx))
    return out, firsts  # type: ignore[return-value]
