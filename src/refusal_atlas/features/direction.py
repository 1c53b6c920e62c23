"""The refusal direction: difference in means, and the choice of its layer l*.

Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction", §2.3-2.4
and Appendix C: r_l = mean_harmful h_l - mean_harmless h_l (Eq. 3). l* minimises the judged
refusal of harmful validation prompts under directional ablation, among layers whose ablation
keeps the harmless next-token distribution close (KL bound) and whose addition induces refusal
(Arditi et al. use the first-token refusal score for the first criterion; it is kept as a
tie-breaker and reported).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial

import pandas as pd
import torch
import torch.nn.functional as nnf
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_atlas.data.prompts import plain_prompts
from refusal_atlas.evaluation.substring_judge import DEFAULT_REFUSAL_SUBSTRINGS, substring_refusals
from refusal_atlas.lm.generation import chat_batches, generate_with_first_logprobs
from refusal_atlas.lm.interventions import DirectionAddition, DirectionalAblation, Intervention
from refusal_atlas.lm.modeling import (
    block_hidden,
    decoder_layers,
    encode_chat,
    last_token_logits,
    position_ids_from_mask,
    special_token_mask,
)

log = logging.getLogger(__name__)


def diff_in_means(acts: torch.Tensor, harmful: torch.Tensor) -> torch.Tensor:
    """``[n_layers, d]`` r_l = mean over harmful - mean over harmless (Arditi et al., Eq. 3).

    ``acts`` is ``[n, n_layers, d]`` (last prompt token); ``harmful`` a boolean mask over n.
    """
    harmful = harmful.bool()
    if harmful.all() or not harmful.any():
        raise ValueError("difference in means needs both harmful and harmless prompts")
    return acts[harmful].mean(0) - acts[~harmful].mean(0)


@torch.no_grad()
def massive_dims(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    k: int,
    system_prompt: str | None = None,
) -> torch.Tensor:
    """``[n_layers, k]`` the dimensions with the largest mean |activation| on special tokens.

    BOS and chat-marker positions carry massive activations (norm ~24k against a median ~174 in
    SmolLM2 at layer 15) in a few fixed dimensions. A direction with weight there, ablated at
    every position, shifts those sinks by thousands and breaks the model (ARCHITECTURE.md).
    """
    layers = decoder_layers(model)
    if k == 0:
        return torch.empty(len(layers), 0, dtype=torch.long)
    enc = encode_chat(tokenizer, instructions, system_prompt, next(model.parameters()).device)
    sink = special_token_mask(tokenizer, enc["input_ids"]) & enc["attention_mask"].bool()
    got: dict[int, torch.Tensor] = {}

    def make_hook(i):
        def hook(_m, _inp, out):
            h = block_hidden(out)
            got[i] = h[sink].abs().mean(0).float().cpu()

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(layers)]
    try:
        model(**enc, position_ids=position_ids_from_mask(enc["attention_mask"]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([got[i].topk(k).indices for i in range(len(layers))])


def zero_dims(r: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """``r`` with ``dims`` (per layer) set to zero."""
    r = r.clone()
    r.scatter_(-1, dims.to(r.device), 0.0)
    return r


def refusal_token_ids(tokenizer: PreTrainedTokenizerBase, strings: Sequence[str]) -> list[int]:
    """First token of each refusal string, as it would start the assistant turn."""
    ids = sorted({tokenizer(s, add_special_tokens=False).input_ids[0] for s in strings})
    if not ids:
        raise ValueError("no refusal tokens")
    return ids


@torch.no_grad()
def last_token_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    *,
    intervention: Intervention | None = None,
    batch_size: int = 16,
    system_prompt: str | None = None,
) -> torch.Tensor:
    """``[n, vocab]`` next-token log-probabilities at the last prompt token."""
    intervention = intervention or Intervention()
    device = next(model.parameters()).device
    out = torch.empty(len(instructions), model.config.vocab_size)
    with intervention.applied(model):
        for idx, enc in chat_batches(tokenizer, instructions, batch_size, system_prompt, device):
            out[idx] = nnf.log_softmax(last_token_logits(model, enc).float(), -1).cpu()
    return out


def refusal_score(logprobs: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """log p(refusal) - log(1 - p(refusal)), p summed over refusal tokens (Arditi et al. §C)."""
    lp = torch.logsumexp(logprobs[:, list(refusal_ids)], -1)
    return lp - torch.log1p(-lp.exp().clamp(max=1 - 1e-7))


@dataclass
class LayerScore:
    layer: int
    val_refusal: float  # substring-judged refusal rate of harmful val generations under ablation
    bypass_score: float  # harmful val first-token refusal score under ablation (lower: refusal removed)
    induce_score: float  # harmless val refusal score under addition (higher: refusal induced)
    kl: float  # harmless val KL(base || ablated) at the last token
    r_norm: float
    eligible: bool
    position: int = -1  # where r was read, counted from the prompt's end (-1: the last token)


def score_layers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directions: torch.Tensor,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_ids: Sequence[int],
    *,
    candidates: Sequence[int],
    kl_max: float,
    min_induce: float = 0.0,
    substrings: Sequence[str] = DEFAULT_REFUSAL_SUBSTRINGS,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    system_prompt: str | None = None,
    base_harmless: torch.Tensor | None = None,
) -> list[LayerScore]:
    """Evaluate every candidate layer's direction on the validation prompts.

    The refusal that counts is the judged one: a first-token score alone misleads on models
    whose answers, too, often start with the refusal token ("I'd be glad to...").
    ``base_harmless``, the unsteered last-token log-probabilities of ``harmless_val``, is computed
    here unless given (a caller scoring several positions computes it once).
    """
    logprobs = partial(last_token_logprobs, model, tokenizer, batch_size=batch_size, system_prompt=system_prompt)
    base_harmless = logprobs(harmless_val) if base_harmless is None else base_harmless
    scores = []
    for layer in tqdm(candidates, desc="direction layers", unit="layer"):
        r = directions[layer]
        abl = DirectionalAblation(r)
        # the generation's first step is the ablated last-token distribution: no extra pass
        gens, first = generate_with_first_logprobs(
            model, tokenizer, harmful_val, max_new_tokens=max_new_tokens, batch_size=batch_size, intervention=abl,
            system_prompt=system_prompt, desc=f"ablate layer {layer}",
        )
        val_refusal = sum(substring_refusals(gens, substrings)) / len(gens)
        bypass = refusal_score(first, refusal_ids).mean()
        kl = nnf.kl_div(logprobs(harmless_val, intervention=abl), base_harmless, log_target=True, reduction="batchmean")
        induce = refusal_score(logprobs(harmless_val, intervention=DirectionAddition(r, layer)), refusal_ids).mean()
        score = LayerScore(
            layer, val_refusal, float(bypass), float(induce), float(kl), float(r.norm()),
            bool(kl < kl_max and induce > min_induce),
        )
        scores.append(score)
        log.info("layer %d: %s", layer, score)
    return scores


def choose(scores: Sequence[LayerScore], eligible_only: bool = True) -> LayerScore:
    """The candidate (layer, and position where there are several) that is eligible (harmless KL
    under the bound, addition induces refusal) and whose ablation leaves the least judged refusal on
    harmful validation prompts; the first-token score breaks ties."""
    eligible = [s for s in scores if s.eligible or not eligible_only]
    if not eligible:
        raise ValueError(
            "no candidate layer passes the filters (harmless KL under direction.kl_max and an induce score "
            "above direction.min_induce_score); relax them, widen the layer range, or set direction.layer"
        )
    return min(eligible, key=lambda s: (s.val_refusal, s.bypass_score))


def choose_layer(scores: Sequence[LayerScore]) -> int:
    """l*: the layer of :func:`choose`."""
    return choose(scores).layer


def scores_frame(scores: Sequence[LayerScore], chosen: int, position: int = -1) -> pd.DataFrame:
    df = pd.DataFrame([asdict(s) for s in scores])
    df["chosen"] = (df["layer"] == chosen) & (df["position"] == position)
    return df


def fit_direction(acts: torch.Tensor, index: pd.DataFrame, split: str) -> tuple[torch.Tensor, pd.DataFrame]:
    """``[n_layers, d]`` diff-in-means r on the plain prompts of ``split``, and those prompts."""
    fit = plain_prompts(index)
    fit = fit[fit.split == split]
    if fit.label.nunique() < 2:
        raise ValueError(f"split {split!r} needs harmful and harmless prompts to fit r")
    raw = diff_in_means(acts[torch.tensor(fit.row.to_numpy())],
                                  torch.tensor((fit.label == "harmful").to_numpy()))
    return raw, fit



def borrow_harmless(acts: torch.Tensor, index: pd.DataFrame, harmless_acts: torch.Tensor,
                    harmless_index: pd.DataFrame, split: str, from_split: str = "train",
                    seed: int = 0) -> tuple[torch.Tensor, pd.DataFrame]:
    """``acts`` and ``index`` with harmless prompts borrowed where ``split`` has none: as many of
    ``harmless_index``'s plain harmless ``from_split`` prompts as ``split`` has plain harmful
    ones (a fixed sample), filed under ``split``.

    Yeo et al.'s Table 1 (github wj210/refusal_sae, src/benchmark.py) fits each benchmark's
    direction on its harmful prompts against the first ``len(benchmark)`` of refusal_direction's
    harmless train prompts; the benchmarks hold harmful prompts only.
    """
    plain = plain_prompts(index)
    here = plain[plain.split == split]
    if (here.label == "harmless").any():
        return acts, index
    n = int((here.label == "harmful").sum())
    pool = plain_prompts(harmless_index)
    pool = pool[(pool.split == from_split) & (pool.label == "harmless")]
    if n == 0 or pool.empty:
        raise ValueError(f"split {split!r} has {n} harmful prompts and the direction promptset "
                         f"{len(pool)} harmless {from_split} prompts to borrow: r cannot be fitted")
    take = pool.sample(n=min(n, len(pool)), random_state=seed).sort_index()
    borrowed = take.assign(row=len(acts) + torch.arange(len(take)).numpy(), split=split, borrowed=True)
    rows = torch.tensor(take.row.to_numpy())
    return torch.cat([acts, harmless_acts[rows].to(acts.dtype)]), pd.concat([index, borrowed], ignore_index=True)


def filter_by_refusal(fit: pd.DataFrame, scores: torch.Tensor) -> pd.DataFrame:
    """The rows of ``fit`` whose base behaviour matches their label: harmful prompts with a positive
    refusal score (the model refuses them), harmless ones with a negative one.

    Arditi et al. 2024 (github andyrdt/refusal_direction, ``filter_data``) drop the train and val
    prompts that fail this before fitting r, so that r contrasts refused with answered requests;
    ``scores`` are :func:`refusal_score` values aligned with ``fit``'s rows.
    """
    if len(scores) != len(fit):
        raise ValueError(f"{len(scores)} refusal scores for {len(fit)} prompts")
    s = scores.numpy()
    keep = ((fit.label == "harmful").to_numpy() & (s > 0)) | ((fit.label == "harmless").to_numpy() & (s < 0))
    kept = fit[keep]
    if kept.label.nunique() < 2:
        raise ValueError(f"the refusal-score filter keeps {int((kept.label == 'harmful').sum())} harmful and "
                         f"{int((kept.label == 'harmless').sum())} harmless prompts: r cannot be fitted; "
                         "set direction.filter: none")
    return kept
