"""How jailbreaks work, seen through SAE features (Yeo et al. 2025, §4.3 "Adversarial jailbreaks").

Each adversarial prompt is set beside its plain harmful parent. A pair is a *successful*
jailbreak when the plain request is refused and the adversarial one is answered, and a *failed*
one when both are refused; a pair whose plain request is already answered breaks nothing and is
left out. For both groups the paper's question is which features the wrapper suppresses:

- *harm features*, read as the mean over the prompt's tokens (the content of the request), and
- *refusal features* (the selected F*), read as the mean over the last prompt tokens, where the
  model decides to refuse.

The relative drop of a group is ``1 − mean(adversarial) / mean(plain)`` over its pairs, with a
paired bootstrap interval. Harm features are not given by the paper's code; here they are the
top-k latents by the harmful-minus-harmless difference of sequence-mean activation (ActDiff over
the whole prompt instead of its maximum) in SAE layers upstream of the refusal direction's layer,
never one of the refusal features. Word occlusion then asks which words of a wrapper carry the
drop: deleting a suppressing word gives the refusal features back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from scipy.stats import bootstrap
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_atlas.lm.generation import chat_batches
from refusal_atlas.lm.modeling import LayerGrab
from refusal_atlas.saes.corpus import token_mask

if TYPE_CHECKING:
    from sae_lens import SAE

OUTCOMES = ("success", "failed")


# ---------------------------------------------------------------------------- pairs
def adversarial_pairs(promptset: pd.DataFrame, allow_unpaired: bool = False) -> pd.DataFrame:
    """Every ``jailbreak`` variant beside the ``plain`` request of the same ``pair_id``.

    Columns: pair_id, category, split, plain_id, plain, adversarial_id, adversarial, wrapper
    (the template id, from ``<pair>-jb-<template>``, else ``"unknown"``) and wrapper_kind (its
    prefix: roleplay, fiction, suffix, wildjailbreak...). A jailbreak without a plain parent is an
    error unless ``allow_unpaired`` (WildJailbreak's eval set has none); it then keeps empty
    plain columns, and only the probes use it.
    """
    plain = promptset[promptset.variant == "plain"][["pair_id", "id", "instruction"]]
    adv = promptset[promptset.variant == "jailbreak"][["pair_id", "id", "instruction", "category", "split"]]
    if adv.empty:
        raise ValueError("the promptset has no jailbreak variants to pair with plain requests")
    pairs = adv.merge(plain, on="pair_id", suffixes=("_adv", "_plain"), how="left")
    orphans = pairs.id_plain.isna()
    if orphans.any() and not allow_unpaired:
        raise ValueError(f"{int(orphans.sum())} jailbreak prompts have no plain parent (pair_id), "
                         f"e.g. {pairs.id_adv[orphans].iloc[0]!r}")
    wrapper = pairs.id_adv.str.partition("-jb-")[2].replace("", "unknown")
    return pd.DataFrame({
        "pair_id": pairs.pair_id, "category": pairs.category, "split": pairs.split,
        "plain_id": pairs.id_plain, "plain": pairs.instruction_plain,
        "adversarial_id": pairs.id_adv, "adversarial": pairs.instruction_adv,
        "wrapper": wrapper, "wrapper_kind": wrapper.str.partition("-")[0],
    }).reset_index(drop=True)


def outcomes(plain_refused: Sequence[bool], adversarial_refused: Sequence[bool],
             adversarial_complied: Sequence[bool] | None = None) -> np.ndarray:
    """``success`` (plain refused, adversarial answered), ``failed`` (both refused) or
    ``plain_answered`` (nothing to break). Where a four-label judge says whether the adversarial
    answer complied, one that neither refuses nor complies (evasive or degenerate) is
    ``evaded``: the wrapper broke the refusal but jailbroke nothing, so it is neither outcome."""
    p = np.asarray(plain_refused, dtype=bool)
    a = np.asarray(adversarial_refused, dtype=bool)
    answered = ~a if adversarial_complied is None else np.asarray(adversarial_complied, dtype=bool)
    return np.where(~p, "plain_answered", np.where(a, "failed", np.where(answered, "success", "evaded")))


# ---------------------------------------------------------------------------- feature reads
@dataclass(frozen=True)
class FeatureRead:
    """A feature set and where it is read: ``positions`` 0 = every real token (the sequence
    mean), N > 0 = the last N real tokens. Special tokens (BOS, chat markers) are never read:
    their massive activations are outside what the SAEs were trained on."""

    features: Mapping[int, torch.Tensor]  # layer -> latent ids
    positions: int = 0


def last_positions(mask: torch.Tensor, n: int) -> torch.Tensor:
    """The last ``n`` True positions of each row of a ``[B, T]`` mask (all of them when n = 0)."""
    if n <= 0:
        return mask
    from_right = mask.flip(-1).long().cumsum(-1).flip(-1)
    return mask & (from_right <= n)


@torch.no_grad()
def sequence_mean_latents(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    groups: Sequence[int],
    saes: Mapping[int, SAE],
    *,
    batch_size: int = 16,
    system_prompt: str | None = None,
) -> dict[int, torch.Tensor]:
    """``{layer: [n_groups, d_sae]}``: per group, the mean over prompts of each latent's mean over
    the prompt's real, non-special tokens. Sums are kept per group, never per prompt, so a 65k-wide
    SAE on every layer costs O(d_sae) memory."""
    groups = torch.as_tensor(groups)
    n_groups = int(groups.max()) + 1
    sums = {l: torch.zeros(n_groups, s.cfg.d_sae, dtype=torch.float64) for l, s in saes.items()}
    device = next(model.parameters()).device
    with LayerGrab(model, list(saes)) as grab, tqdm(total=len(instructions), desc="harm latents") as bar:
        for idx, enc in chat_batches(tokenizer, instructions, batch_size, system_prompt, device):
            hidden = grab.run(enc)
            keep = token_mask(tokenizer, enc)
            w = keep.float() / keep.sum(-1, keepdim=True).clamp(min=1)
            g = groups[idx]
            for layer, sae in saes.items():
                h = hidden[layer].to(sae.W_dec.device, sae.W_dec.dtype)
                per_prompt = torch.einsum("bt,btf->bf", w.to(h.device, h.dtype), sae.encode(h)).double().cpu()
                sums[layer].index_add_(0, g, per_prompt)
            bar.update(len(idx))
    counts = torch.bincount(groups, minlength=n_groups).clamp(min=1).double()[:, None]
    return {l: (s / counts).float() for l, s in sums.items()}


def harm_features(means: Mapping[int, torch.Tensor], k: int,
                  exclude: Mapping[int, Sequence[int]] | None = None) -> pd.DataFrame:
    """Top-``k`` latents by (harmful − harmless) sequence-mean activation over the given layers.

    ``means[l]`` is ``[2, d_sae]``: row 0 harmful, row 1 harmless (``sequence_mean_latents``).
    ``exclude`` holds the refusal features, which are never also counted as harm features.
    """
    rows = []
    for layer, m in means.items():
        diff = (m[0] - m[1]).clone()
        for f in (exclude or {}).get(layer, []):
            diff[f] = -torch.inf
        for f in torch.topk(diff, min(k, diff.numel())).indices.tolist():
            rows.append((layer, f, float(diff[f]), float(m[0, f]), float(m[1, f])))
    table = pd.DataFrame(rows, columns=["layer", "feature", "score", "mean_act_harmful", "mean_act_harmless"])
    table = table[np.isfinite(table.score)].sort_values("score", ascending=False).head(k)
    return table.assign(rank=np.arange(1, len(table) + 1)).reset_index(drop=True)


def as_read(table: pd.DataFrame, positions: int) -> FeatureRead:
    """A ``(layer, feature)`` table as a :class:`FeatureRead`."""
    feats = {int(l): torch.tensor(sorted(g.feature.astype(int))) for l, g in table.groupby("layer")}
    return FeatureRead(feats, positions)


@torch.no_grad()
def read_features(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    saes: Mapping[int, SAE],
    reads: Mapping[str, FeatureRead],
    *,
    batch_size: int = 16,
    system_prompt: str | None = None,
    desc: str = "feature reads",
) -> dict[str, np.ndarray]:
    """Per prompt and per read: the mean activation of the read's latents over its positions."""
    layers = sorted({l for r in reads.values() for l in r.features})
    missing = [l for l in layers if l not in saes]
    if missing:
        raise ValueError(f"no SAE at layers {missing}")
    out = {name: np.zeros(len(instructions)) for name in reads}
    device = next(model.parameters()).device
    with LayerGrab(model, layers) as grab, tqdm(total=len(instructions), desc=desc) as bar:
        for idx, enc in chat_batches(tokenizer, instructions, batch_size, system_prompt, device):
            hidden = grab.run(enc)
            keep = token_mask(tokenizer, enc)
            weights = {}
            for name, read in reads.items():
                where = last_positions(keep, read.positions)
                weights[name] = where.float() / where.sum(-1, keepdim=True).clamp(min=1)
            totals = {name: torch.zeros(len(idx), dtype=torch.float64) for name in reads}
            for layer in layers:  # one layer's latents at a time: a 65k-wide SAE at every token is large
                sae = saes[layer]
                h = hidden.pop(layer).to(sae.W_dec.device, sae.W_dec.dtype)
                latents = sae.encode(h)
                for name, read in reads.items():
                    if layer in read.features:
                        acts = latents[..., read.features[layer].to(h.device)]  # [B, T, n]
                        w = weights[name].to(acts.device, acts.dtype)
                        totals[name] += torch.einsum("bt,btf->b", w, acts).double().cpu()
                del latents
            for name, read in reads.items():
                n_feats = sum(len(f) for f in read.features.values())
                out[name][idx] = (totals[name] / max(1, n_feats)).numpy()
            bar.update(len(idx))
    return out


# ---------------------------------------------------------------------------- statistics
def relative_drop(plain: np.ndarray, adversarial: np.ndarray, *, n_resamples: int = 2000,
                  confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """``1 − mean(adversarial)/mean(plain)`` over pairs, with a paired percentile bootstrap."""
    plain, adversarial = np.asarray(plain, float), np.asarray(adversarial, float)
    n = len(plain)

    def stat(p, a, axis=-1):
        return 1.0 - a.mean(axis=axis) / p.mean(axis=axis)

    out = {"n": n, "mean_plain": float(plain.mean()) if n else np.nan,
           "mean_adversarial": float(adversarial.mean()) if n else np.nan}
    if n == 0 or plain.mean() == 0:
        return {**out, "drop": np.nan, "ci_low": np.nan, "ci_high": np.nan}
    drop = float(stat(plain, adversarial))
    if n < 2:
        return {**out, "drop": drop, "ci_low": drop, "ci_high": drop}
    res = bootstrap((plain, adversarial), stat, paired=True, vectorized=True, n_resamples=n_resamples,
                    confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return {**out, "drop": drop, "ci_low": float(ci.low), "ci_high": float(ci.high)}


def drop_table(pairs: pd.DataFrame, by: Sequence[str], kinds: Sequence[str], boot: Mapping) -> pd.DataFrame:
    """Relative drops of each feature kind per group of ``by`` (pairs hold ``<kind>_plain`` and
    ``<kind>_adversarial`` columns)."""
    rows = []
    for key, g in pairs.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        for kind in kinds:
            d = relative_drop(g[f"{kind}_plain"].to_numpy(), g[f"{kind}_adversarial"].to_numpy(), **boot)
            rows.append({**dict(zip(by, key)), "features": kind, **d})
    cols = [*by, "features", "n", "mean_plain", "mean_adversarial", "drop", "ci_low", "ci_high"]
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------------------- words
_WORD = re.compile(r"[\w'-]+")


def _norm(word: str) -> str:
    m = _WORD.search(word.lower())
    return m.group(0) if m else ""


def occlusions(adversarial: str, plain: str, max_words: int | None = None) -> list[tuple[str, str]]:
    """``(word, prompt without it)`` for each word of the wrapper, i.e. each word of the
    adversarial prompt that is not in its plain request."""
    request = {_norm(w) for w in plain.split()}
    words = adversarial.split()
    out = []
    for i, w in enumerate(words):
        key = _norm(w)
        if key and key not in request:
            out.append((key, " ".join(words[:i] + words[i + 1:])))
    return out[:max_words] if max_words else out


def word_effects(effects: pd.DataFrame, min_count: int, boot: Mapping) -> pd.DataFrame:
    """Per word: the mean rise of the refusal read when the word is deleted (positive = the word
    suppressed refusal features), with its n and bootstrap interval, strongest first."""
    from refusal_atlas.core.stats import bootstrap_mean

    rows = []
    for word, g in effects.groupby("word"):
        if len(g) < min_count:
            continue
        r = bootstrap_mean(g.delta.to_numpy(), **boot)
        rows.append({"word": word, "mean_delta": r.rate, "ci_low": r.ci_low, "ci_high": r.ci_high, "n": r.n,
                     "prompts": g.adversarial_id.nunique()})
    cols = ["word", "mean_delta", "ci_low", "ci_high", "n", "prompts"]
    return pd.DataFrame(rows, columns=cols).sort_values("mean_delta", ascending=False).reset_index(drop=True)
