"""Capability benchmarks under an intervention: ARC-Challenge, MMLU and GSM8K (Yeo et al. 2025 §4.1).

The paper reports what a steer costs on general ability. Here every benchmark is scored
zero-shot in the model's own chat template, so steered and unsteered runs see the same prompt:

- multiple choice (ARC-Challenge, Clark et al. 2018; MMLU, Hendrycks et al. 2021): the options
  are listed as ``A.``, ``B.``, ...; the prediction is the option letter with the highest logit
  at the first response position (the letters alone compete, so no output parsing is needed);
- GSM8K (Cobbe et al. 2021): a greedy answer; correct when its last number equals the number
  after ``####`` in the reference solution.

Yeo et al.'s code (github wj210/refusal_sae, utils/eval_capability.py) scores them another way,
kept as ``protocol`` switches for reproduction: ARC as the one greedy token after the assistant
turn is prefilled with "The best answer is (" (``prefill_greedy``: a token that is no letter is
wrong), and GSM8K as a step-by-step answer, then "So the final numeric answer is:" and the first
number of a short continuation (``reasoning_then_answer``).

Each item yields a 0/1, so accuracies come with n and a bootstrap interval downstream.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_atlas.data.datasets import ChoiceItem, normalise_number
from refusal_atlas.lm.generation import chat_batches, generate
from refusal_atlas.lm.interventions import Intervention
from refusal_atlas.lm.modeling import last_token_logits

LETTERS = "ABCDEFGH"
CHOICE_PROTOCOLS = ("letter_logits", "prefill_greedy")
GSM8K_PROTOCOLS = ("last_number", "reasoning_then_answer")
ANSWER_PREFILL = "The best answer is ("
ANSWER_CUE = "\nSo the final numeric answer is:"


def choice_prompt(item: ChoiceItem) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    return f"{item.question}\n\n{options}\n\nAnswer with the letter of the correct option only."


def prefill_choice_prompt(item: ChoiceItem) -> str:
    """The multiple-choice prompt whose answer the ``prefill_greedy`` protocol reads after
    :data:`ANSWER_PREFILL`: options as ``(A) ...``, and the closing sentence it asks for."""
    n = len(item.choices)
    options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(item.choices))
    letters = ", ".join(LETTERS[: n - 1]) + f" or {LETTERS[n - 1]}"
    return (f"Choose the best answer to the question among the options {letters}.\nQuestion: {item.question.strip()}\n"
            f"Choices:\n{options}\nEnd your response with \"The best answer is (X)\", where X is the letter of "
            "your answer.")


def letter_ids(tokenizer: PreTrainedTokenizerBase, n: int) -> list[int]:
    """The token a response opening with each letter starts with; letters must tokenise apart."""
    ids = [tokenizer(LETTERS[i], add_special_tokens=False).input_ids[0] for i in range(n)]
    if len(set(ids)) != n:
        raise ValueError(f"the tokenizer does not give {n} option letters distinct first tokens")
    return ids


@torch.no_grad()
def multiple_choice(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence[ChoiceItem], *,
                    intervention: Intervention | None = None, batch_size: int = 16, system_prompt: str | None = None,
                    desc: str = "multiple choice", protocol: str = "letter_logits") -> np.ndarray:
    """Per item, whether the highest-logit option letter at the first response position is the
    answer (``letter_logits``), or the greedy token after :data:`ANSWER_PREFILL` is (``prefill_greedy``)."""
    if protocol not in CHOICE_PROTOCOLS:
        raise ValueError(f"multiple-choice protocol {protocol!r} is not one of {CHOICE_PROTOCOLS}")
    if protocol == "prefill_greedy":
        preds = generate(model, tokenizer, [prefill_choice_prompt(i) for i in items], max_new_tokens=1,
                         batch_size=batch_size, intervention=intervention, system_prompt=system_prompt, desc=desc,
                         prefills=[ANSWER_PREFILL] * len(items))
        return np.array([p.strip().lower() == LETTERS[i.answer].lower() for p, i in zip(preds, items)], dtype=bool)
    intervention = intervention or Intervention()
    device = next(model.parameters()).device
    width = max(len(i.choices) for i in items)
    ids = torch.tensor(letter_ids(tokenizer, width), device=device)
    out = np.zeros(len(items), dtype=bool)
    prompts = [choice_prompt(i) for i in items]
    with intervention.applied(model):
        for idx, enc in chat_batches(tokenizer, prompts, batch_size, system_prompt, device):
            scores = last_token_logits(model, enc)[:, ids].float()
            for row, i in enumerate(idx):
                n = len(items[i].choices)  # fewer options than the widest item: the others cannot win
                out[i] = int(scores[row, :n].argmax()) == items[i].answer
    return out


def gsm8k(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence[tuple[str, str]], *,
          intervention: Intervention | None = None, batch_size: int = 16, max_new_tokens: int = 256,
          system_prompt: str | None = None, protocol: str = "last_number") -> np.ndarray:
    """Per problem, whether the greedy answer's last number equals the reference number
    (``last_number``); or, with ``reasoning_then_answer``, whether the first number after the
    reasoning and :data:`ANSWER_CUE` does (``max_new_tokens`` bounds the reasoning)."""
    if protocol not in GSM8K_PROTOCOLS:
        raise ValueError(f"GSM8K protocol {protocol!r} is not one of {GSM8K_PROTOCOLS}")
    kw = dict(batch_size=batch_size, intervention=intervention, system_prompt=system_prompt)
    if protocol == "reasoning_then_answer":
        prompts = [f"Question: {q}\nA: Let's think step by step." for q, _ in items]
        reasoning = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, desc="GSM8K reasoning", **kw)
        answers = generate(model, tokenizer, prompts, max_new_tokens=10, desc="GSM8K answer",
                           prefills=[r + ANSWER_CUE for r in reasoning], **kw)
        return np.array([normalise_number(a, first=True) == ref for a, (_, ref) in zip(answers, items)], dtype=bool)
    prompts = [f"{q}\n\nSolve it step by step, then give the final number." for q, _ in items]
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, desc="GSM8K", **kw)
    return np.array([normalise_number(a) == ref for a, (_, ref) in zip(answers, items)], dtype=bool)


def orderings(item: ChoiceItem) -> list[ChoiceItem]:
    """The item under every ordering of its options (n! of them), the answer index following."""
    out = []
    for perm in itertools.permutations(range(len(item.choices))):
        out.append(ChoiceItem(item.id, item.question, tuple(item.choices[j] for j in perm), perm.index(item.answer)))
    return out


def ordering_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence[ChoiceItem],
                      **kw) -> np.ndarray:
    """Per item, the fraction of its option orderings answered correctly (SAEBench's unlearning
    evaluation, after Muhamed et al. 2025 §4: an answer that depends on the order is no knowledge)."""
    per_item = [orderings(it) for it in items]
    correct = multiple_choice(model, tokenizer, [o for os_ in per_item for o in os_], **kw)
    bounds = np.cumsum([0] + [len(os_) for os_ in per_item])
    return np.array([correct[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])])


def robust_items(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence[ChoiceItem],
                 **kw) -> list[ChoiceItem]:
    """The items the model answers correctly under every ordering of their options."""
    return [it for it, acc in zip(items, ordering_accuracy(model, tokenizer, items, **kw)) if acc == 1.0]
