"""The refusal model organism: supervised refusal tuning with self-distillation.

Small open chat models (SmolLM2-135M-Instruct) barely refuse, so the embedded default first
tunes one into a model organism that does, as safety tuning would: harmful training prompts are
mapped to short refusals and harmless ones to the model's own greedy answers (self-distillation
keeps its behaviour there). The loss is on response tokens only.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as nnf
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from refusal_atlas.lm.generation import generate
from refusal_atlas.lm.modeling import (
    attend_to_prefix,
    attention_implementation,
    autocast,
    common_prefix_length,
    decoder_layers,
    end_of_turn_ids,
    format_chat,
)

DEFAULT_REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that request.",
    "I cannot help with that. It could cause serious harm.",
    "I can't assist with that request.",
    "I'm unable to provide that information because it could be used to hurt people.",
    "I apologize, but I cannot help with this.",
    "I'm not able to help with that, but I'm happy to help with something else.",
)


@dataclass
class OrganismConfig:
    """Hyper-parameters of :func:`refusal_tune` (``organism`` section of the config)."""

    refusal_templates: Sequence[str] = DEFAULT_REFUSALS
    epochs: int = 1
    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 3
    batch_size: int = 16
    distill_max_new_tokens: int = 32
    generation_batch_size: int = 32
    freeze_embeddings: bool = True
    train_from_layer: int = 0
    decision_weight: float = 1.0
    # λ of the unlikelihood term on the contrastive cases' refusals (0: none; see response_loss)
    contrastive_unlikelihood: float = 0.0
    autocast_dtype: str = "bfloat16"
    attn_implementation: str | None = "eager"
    seed: int = 0


def refusal_for(prompt_id: str, templates: Sequence[str]) -> str:
    """A fixed template per prompt, so reruns train on identical data."""
    h = int(hashlib.sha256(prompt_id.encode()).hexdigest(), 16)
    return templates[h % len(templates)]


@dataclass
class Example:
    prompt: str
    response: str
    ends_turn: bool
    # Scales this example's loss: a contrastive case weighted w counts as w copies of it.
    weight: float = 1.0
    # A response to make unlikely (a refusal of a safe look-alike), not one to learn
    negative: bool = False


class HarmlessCase(NamedTuple):
    """A harmless training prompt: answered with the base model's own words ``repeats`` times."""

    prompt: str
    repeats: int = 1
    weight: float = 1.0
    contrastive: bool = False  # a safe look-alike of a harmful request: a twin, bait, the contrast set


def _tokenize(tok: PreTrainedTokenizerBase, ex: Example, eot: str) -> tuple[list[int], list[int]]:
    prompt_ids = tok(format_chat(tok, [ex.prompt])[0], add_special_tokens=False).input_ids
    response = ex.response + (eot if ex.ends_turn else "")
    resp_ids = tok(response, add_special_tokens=False).input_ids
    labels = list(resp_ids)
    if ex.negative and labels:
        # Refusals and answers share their first token ("I"): only what follows it is the refusal
        labels[0] = -100
    return prompt_ids + resp_ids, [-100] * len(prompt_ids) + labels


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int,
             row_weights: Sequence[float] | None = None,
             negative: Sequence[bool] | None = None) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (i, lab) in enumerate(batch):  # right padding: positions are natural while training
        ids[row, : len(i)] = torch.tensor(i)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(i)] = 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if row_weights is not None:
        out["row_weight"] = torch.tensor(row_weights, dtype=torch.float32)
    if negative is not None and any(negative):
        out["negative"] = torch.tensor(negative, dtype=torch.bool)
    return out


def _first_label(labels: Sequence[int]) -> int:
    return next((i for i, t in enumerate(labels) if t != -100), len(labels))


def shared_prefix_length(data: Sequence[tuple[list[int], list[int]]]) -> int:
    """Leading tokens that every ``(ids, labels)`` sequence shares, stopping before the token
    ahead of each first label, which predicts that label."""
    if not data:
        return 0
    return common_prefix_length([ids for ids, _ in data], min(_first_label(lab) for _, lab in data) - 1)


def _decoder_hidden(decoder, batch: dict[str, torch.Tensor], prefix: torch.Tensor | None) -> torch.Tensor:
    """Last hidden states of ``prefix + batch`` rows at the batch's positions.

    Causal attention makes a shared prefix's states the same in every row, so it runs once at
    batch size 1 and the rows attend to its KV cache; gradients reach it through that cache.
    """
    if prefix is None or prefix.numel() == 0:
        return decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    rows, width, p = *batch["input_ids"].shape, prefix.numel()
    cache = decoder(input_ids=prefix[None], use_cache=True).past_key_values
    mask = attend_to_prefix(cache, batch["attention_mask"])
    positions = torch.arange(p, p + width, device=prefix.device)[None].expand(rows, -1)
    return decoder(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                   past_key_values=cache, use_cache=True).last_hidden_state


def response_loss(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    decision_weight: float = 1.0,
    prefix: torch.Tensor | None = None,
    unlikelihood: float = 0.0,
) -> torch.Tensor:
    """Weighted mean next-token cross-entropy over response tokens only, plus an unlikelihood
    term on the batch's ``negative`` rows.

    The first response token carries weight ``decision_weight``: it is where the model decides
    to refuse or to answer, while the rest of a refusal is a memorised template. A batch's
    ``row_weight`` scales each row's tokens, so a row of weight w counts as w copies of it. The LM head
    runs only where a label exists: with a 49k vocabulary, full-sequence logits would cost more
    than the rest of the step on a CPU. ``prefix`` holds tokens that precede every row of
    ``batch`` (see :func:`shared_prefix_length`); the loss equals that of the concatenated rows.

    A negative row is a refusal of a safe prompt. Its term is a sequence-level unlikelihood
    (after Welleck et al.'s 2020 unlikelihood training, taken over the sequence's mean
    log-probability m):
    ``-log(1 - exp(m))``, near zero once the refusal is unlikely, and large while the model would
    say it. ``unlikelihood`` is λ, the term's weight beside the cross-entropy.
    """
    hidden = _decoder_hidden(model.get_decoder(), batch, prefix)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    losses = nnf.cross_entropy(logits.float(), targets[keep], reduction="none")
    first = keep & ~nnf.pad(keep[:, :-1], (1, 0), value=False)  # first labelled position per row
    weights = torch.where(first[keep], decision_weight, 1.0)
    if "row_weight" in batch:
        weights = weights * batch["row_weight"].to(weights.device)[:, None].expand_as(targets)[keep]
    if "negative" not in batch:
        return (weights * losses).sum() / weights.sum()
    rows = torch.arange(len(targets), device=targets.device)[:, None].expand_as(targets)[keep]
    neg = batch["negative"].to(rows.device)[rows]
    pos = ~neg
    loss = (weights[pos] * losses[pos]).sum() / weights[pos].sum() if pos.any() else losses.sum() * 0.0
    counts = torch.zeros(len(targets), device=losses.device).index_add_(0, rows[neg], torch.ones_like(losses[neg]))
    mean_logp = torch.zeros(len(targets), device=losses.device).index_add_(0, rows[neg], -losses[neg])
    negative_rows = counts > 0
    mean_logp = mean_logp[negative_rows] / counts[negative_rows]
    # log1p(-exp(m)) is finite for m < 0; a refusal the model is certain of is held just below 0
    ul = -torch.log1p(-torch.exp(mean_logp.clamp(max=-1e-4)))
    return loss + unlikelihood * ul.mean()


def length_bucketed_order(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length: shuffle, sort within windows of 8 batches, shuffle batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 8 * batch_size
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def build_examples(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    harmful: Sequence[tuple[str, str]],
    harmless: Sequence[HarmlessCase | tuple],
    cfg: OrganismConfig,
) -> list[Example]:
    """Refusals for ``(id, prompt)`` harmful pairs; the base model's own answers for the harmless
    cases (:class:`HarmlessCase`, or a tuple of its fields), each answer generated once and
    repeated. With ``cfg.contrastive_unlikelihood``, each contrastive case adds a negative example:
    a refusal (one of ``cfg.refusal_templates``, picked per prompt as for harmful ones) to be made
    unlikely."""
    harmless = [h if isinstance(h, HarmlessCase) else HarmlessCase(*h) for h in harmless]
    prompts = [h.prompt for h in harmless]
    answers = generate(
        model,
        tok,
        prompts,
        max_new_tokens=cfg.distill_max_new_tokens,
        batch_size=cfg.generation_batch_size,
        desc="self-distillation answers",
    )
    n_tokens = [len(tok(a, add_special_tokens=False).input_ids) for a in answers]
    examples = [Example(p, refusal_for(pid, cfg.refusal_templates), True) for pid, p in harmful]
    for case, a, n in zip(harmless, answers, n_tokens):
        # An answer cut at the budget did not end its turn: teach no end-of-turn there.
        examples += [Example(case.prompt, a, n < cfg.distill_max_new_tokens, case.weight)] * case.repeats
        if case.contrastive and cfg.contrastive_unlikelihood > 0:
            examples.append(Example(case.prompt, refusal_for(case.prompt, cfg.refusal_templates), False,
                                    negative=True))
    return examples


def refusal_tune(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    cfg: OrganismConfig,
) -> dict:
    """Fine-tune ``model`` in place on ``examples``; returns the training log."""
    eot_ids = end_of_turn_ids(tok)
    eot = tok.convert_ids_to_tokens(eot_ids[0]) if tok.eos_token is None else tok.eos_token
    data = [_tokenize(tok, ex, eot) for ex in examples]
    row_weights = [ex.weight for ex in examples]
    weighted = any(w != 1.0 for w in row_weights)
    negative = [ex.negative for ex in examples]
    # The system header (24 of ~62 tokens here) is computed once a step, not once a row.
    shared = shared_prefix_length(data)
    device = next(model.parameters()).device
    prefix = torch.tensor(data[0][0][:shared], dtype=torch.long, device=device)
    data = [(ids[shared:], lab[shared:]) for ids, lab in data]
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.freeze_embeddings:
        # Tied to the LM head in small models: tuning it moves every token's logit at once.
        model.get_input_embeddings().weight.requires_grad_(False)
    # Frozen bottom blocks need no backward pass at all: ~25% faster steps with 10 of 30 frozen.
    for layer in decoder_layers(model)[: cfg.train_from_layer]:
        layer.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(data) / cfg.batch_size)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, steps)
    losses: list[float] = []
    t0 = time.time()
    model.train()
    lengths = [len(ids) for ids, _ in data]
    with (
        tqdm(total=steps, desc="refusal tuning", unit="step") as bar,
        attention_implementation(model, cfg.attn_implementation),
    ):
        for _ in range(cfg.epochs):
            for idx in length_bucketed_order(lengths, cfg.batch_size, rng):
                batch = _collate([data[i] for i in idx], tok.pad_token_id,
                                 [row_weights[i] for i in idx] if weighted else None, [negative[i] for i in idx])
                # bf16 matmuls, fp32 master weights: 2.6x faster steps on this CPU
                with autocast(model, cfg.autocast_dtype):
                    loss = response_loss(model, {k: v.to(device) for k, v in batch.items()}, cfg.decision_weight,
                                         prefix, cfg.contrastive_unlikelihood)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
    model.eval()
    model.requires_grad_(True)
    return {
        "steps": steps,
        "examples": len(data),
        "shared_prefix_tokens": shared,
        "seconds": round(time.time() - t0, 1),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "losses": losses,
    }
