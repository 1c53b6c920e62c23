"""What an intervention costs: cross-entropy on the model's own answers and on generic text.

Yeo et al. 2025 §4.1 ("Capabilities") measure the CE of the unsteered model's responses to
harmless prompts under the intervention. The reference sums it over a batch's tokens and divides
by the batch's padded positions (:func:`reference_batch_ce`); here every response is normalised by
its own number of response tokens, so long answers and long prompts weigh no differently.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as nnf
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_atlas.lm.generation import length_sorted_batches
from refusal_atlas.lm.interventions import Intervention
from refusal_atlas.lm.modeling import end_of_turn_id, format_chat, position_ids_from_mask


def _left_pad(rows: Sequence[list], value) -> torch.Tensor:
    return pad_sequence([torch.tensor(r) for r in rows], batch_first=True, padding_value=value, padding_side="left")


@torch.no_grad()
def _token_ce(model: PreTrainedModel, seqs: Sequence[list[int]], scored: Sequence[list[bool]], pad_id: int,
              batch_size: int, intervention: Intervention, prompt_ids: Sequence[str] | None, desc: str,
              reference_batch: int | None = None) -> np.ndarray:
    """Per sequence, the mean next-token CE over the positions flagged in ``scored``; with
    ``reference_batch``, :func:`reference_batch_ce` of the scored sums instead."""
    device = next(model.parameters()).device
    out = np.full(len(seqs), np.nan)
    sums = np.zeros(len(seqs))
    with intervention.applied(model):
        for idx in tqdm(length_sorted_batches([len(s) for s in seqs], batch_size), desc=desc, unit="batch"):
            ids = _left_pad([seqs[i] for i in idx], pad_id).to(device)
            mask = _left_pad([[1] * len(seqs[i]) for i in idx], 0).to(device)
            flags = _left_pad([scored[i] for i in idx], False).to(device)
            rows = intervention.rows([prompt_ids[i] for i in idx]) if prompt_ids is not None else nullcontext()
            # Left padding ends every row at the same position, so the scored targets and the
            # positions predicting them lie in the last ``tail`` columns: the LM head (a large
            # share of a small model's compute) runs on those alone.
            tail = max(2, max(len(seqs[i]) - scored[i].index(True) + 1 if any(scored[i]) else 1 for i in idx))
            with rows:
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                               use_cache=False, logits_to_keep=tail).logits
            ids, mask, flags = ids[:, -tail:], mask[:, -tail:], flags[:, -tail:]
            ce = nnf.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
            # a target counts only when the position predicting it is a real token, not padding
            keep = (flags[:, 1:] & mask[:, :-1].bool()).float()
            summed, counts = (ce * keep).sum(1), keep.sum(1)
            per_seq = summed / counts.clamp(min=1)
            for row, i in enumerate(idx):
                out[i] = float(per_seq[row]) if counts[row] > 0 else np.nan
                sums[i] = float(summed[row])
    if reference_batch is not None:
        return reference_batch_ce(sums, [len(s) for s in seqs], reference_batch)
    return out


def reference_batch_ce(sums: Sequence[float], lengths: Sequence[int], batch_size: int) -> np.ndarray:
    """Yeo et al.'s CE (github wj210/refusal_sae, ``get_input_ce_loss``): per batch of
    ``batch_size`` consecutive sequences, the summed CE of its scored tokens divided by every
    position of the left-padded batch (rows × its longest sequence), prompt and padding counting
    as zero. One value per batch, in order.

    It is not a per-token CE: a batch with longer prompts or more padding scores lower, so it
    compares conditions only on identical batches (``capabilities.ce_reduction``).
    """
    sums, lengths = np.asarray(sums, dtype=float), np.asarray(lengths)
    return np.array([sums[i:i + batch_size].sum() / (len(sums[i:i + batch_size]) * lengths[i:i + batch_size].max())
                     for i in range(0, len(sums), batch_size)])


def response_ce(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, instructions: Sequence[str],
                responses: Sequence[str], *, intervention: Intervention | None = None, batch_size: int = 16,
                system_prompt: str | None = None, prompt_ids: Sequence[str] | None = None,
                desc: str = "response CE", end_of_turn: bool = True, reference_batch: int | None = None) -> np.ndarray:
    """Per response, the mean CE (nats/token) of its tokens after the chat prompt.

    The response is scored through its end-of-turn token, so a steer that makes the model stop
    early or ramble is charged for it; an empty response (the model ended its turn at once) is
    scored on that token alone. ``end_of_turn=False`` scores the text alone, for responses cut at
    a token budget (an empty one is then NaN).
    """
    prompts = format_chat(tokenizer, instructions, system_prompt)
    eot = end_of_turn_id(tokenizer)
    seqs, scored = [], []
    for p, r in zip(prompts, responses):
        p_ids = tokenizer(p, add_special_tokens=False).input_ids
        r_ids = tokenizer(r, add_special_tokens=False).input_ids
        r_ids = r_ids + [eot] if end_of_turn else r_ids
        seqs.append(p_ids + r_ids)
        scored.append([False] * len(p_ids) + [True] * len(r_ids))
    return _token_ce(model, seqs, scored, tokenizer.pad_token_id, batch_size, intervention or Intervention(),
                     prompt_ids, desc, reference_batch)


def text_ce(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *,
            intervention: Intervention | None = None, batch_size: int = 16, max_tokens: int = 256,
            desc: str = "text CE", reference_batch: int | None = None) -> np.ndarray:
    """Per text, the mean next-token CE (nats/token) of plain text without a chat template."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    seqs = [(bos + tokenizer(t, add_special_tokens=False).input_ids)[:max_tokens] for t in texts]
    scored = [[True] * len(s) for s in seqs]
    return _token_ce(model, seqs, scored, tokenizer.pad_token_id, batch_size, intervention or Intervention(),
                     None, desc, reference_batch)
