"""Dynamic SAE guardrails (Muhamed et al., COLM 2025), and the same gate as a refusal guardrail.

Unlearning (ARCHITECTURE.md, "Dynamic guardrails"):

1. Per latent i of one SAE: mean activation on forget tokens and on retain tokens (special
   tokens excluded); ``F_i = mean_forget²``, ``R_i = mean_retain²``, ``ρ_i = F_i / (R_i + ε)``.
2. Keep latents with ``ρ_i ≥`` its q-th percentile, then the top-n of those by F.
3. ``τ`` = the 95th percentile, over retain sequences, of the fraction of real tokens at which
   any selected latent fires (> 0). Padding and special tokens are never counted.
4. Gate, per sequence: when its firing fraction exceeds τ, set the selected latents to ``−c``
   on the tokens where they fire; the SAE error term is kept (only the change of the selected
   latents is decoded and added). A closed gate leaves the residual stream untouched.

The static clamp of SAEBench is the same edit with the gate always open. The refusal guardrail
(an extension) fires the same kind of gate on *harm* latents (forget = harmful prompts, retain =
harmless ones) and, for the prompts it opens on, induces refusal: the ``set`` clamp of the
refusal features, or the refusal direction added.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from refusal_atlas.core.io import read_lines
from refusal_atlas.lm.interventions import Intervention, _replace_output
from refusal_atlas.lm.modeling import LayerGrab, decoder_layers, position_ids_from_mask, special_token_mask
from refusal_atlas.steering.clamp import FeatureSet

if TYPE_CHECKING:
    from sae_lens import SAE


# ---------------------------------------------------------------------------- selection
@torch.no_grad()
def feature_statistics(sae: SAE, forget: torch.Tensor, retain: torch.Tensor, *, eps: float = 1e-6,
                       batch_size: int = 4096) -> pd.DataFrame:
    """Per latent: mean activation on forget and retain tokens, F, R and ρ = F/(R+ε) (step 1).

    ``forget`` and ``retain`` are ``[n_tokens, d_model]`` resid_post rows of real, non-special
    tokens (:func:`refusal_atlas.saes.token_resid_post`).
    """
    def mean_latents(x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
        for i in range(0, len(x), batch_size):
            total += sae.encode(x[i:i + batch_size].to(sae.W_dec.device, sae.W_dec.dtype)).double().sum(0).cpu()
        return total / max(1, len(x))

    if len(forget) == 0 or len(retain) == 0:
        raise ValueError("feature statistics need forget and retain tokens")
    mf, mr = mean_latents(forget), mean_latents(retain)
    f, r = mf**2, mr**2
    return pd.DataFrame({"feature": np.arange(sae.cfg.d_sae), "mean_forget": mf.numpy(), "mean_retain": mr.numpy(),
                         "F": f.numpy(), "R": r.numpy(), "rho": (f / (r + eps)).numpy()})


def select_features(stats: pd.DataFrame, q: float, n: int) -> pd.DataFrame:
    """Latents with ρ at or above its q-th percentile, then the top-n by F (step 2)."""
    live = stats[stats.F > 0]
    if live.empty:
        raise ValueError("no latent fires on the forget text")
    cut = np.percentile(live.rho, q)
    kept = live[live.rho >= cut].sort_values(["F", "feature"], ascending=[False, True]).head(n)
    return kept.assign(rank=np.arange(1, len(kept) + 1), q=q, rho_cut=cut).reset_index(drop=True)


def calibrate_tau(retain_fractions: Sequence[float], quantile: float = 95.0) -> float:
    """τ: the ``quantile``-th percentile of the retain sequences' firing fractions (step 3)."""
    x = np.asarray(retain_fractions, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("no retain sequence to calibrate tau on")
    return float(np.percentile(x, quantile))


# ---------------------------------------------------------------------------- the gate
@dataclass
class DynamicSAEGuard(Intervention):
    """The gated clamp at one SAE layer (step 4).

    The firing fraction of a sequence counts the real, non-special tokens where any selected
    latent is > 0, over the real, non-special tokens seen so far: the prompt at prefill, then
    each generated token adds to it, so a gate can open during generation. ``static=True`` is
    SAEBench's always-on clamp. ``fractions`` records each sequence's fraction after the last
    forward pass (for calibration), ``opened`` whether its gate was open.
    """

    sae: SAE
    layer: int
    features: torch.Tensor
    tau: float = float("inf")
    value: float = -500.0
    static: bool = False
    #: where an open gate writes ``value``: ``firing_only`` (ours) sets the selected latents that
    #: fire at a token; ``all_selected`` (Muhamed et al.'s utils/intervention.py) sets every selected
    #: latent at each token where any of them fires
    edit: str = "firing_only"
    fractions: np.ndarray = field(default_factory=lambda: np.zeros(0))
    opened: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    shares_prefix = False  # the gate counts firing over each whole sequence, from its prefill

    def __post_init__(self) -> None:
        if self.edit not in ("firing_only", "all_selected"):
            raise ValueError(f"edit must be firing_only or all_selected, not {self.edit!r}")
        self.features = torch.as_tensor(self.features, dtype=torch.long)
        self._counts: tuple[torch.Tensor, torch.Tensor] | None = None
        self._real: torch.Tensor | None = None

    def _capture(self, tokenizer):
        """A pre-hook on the model that keeps which positions of the coming pass are real tokens."""
        def hook(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask[:, -ids.shape[1]:].bool()
            self._real = real & ~special_token_mask(tokenizer, ids)
            if ids.shape[1] > 1 or self._counts is None or self._counts[0].shape[0] != ids.shape[0]:
                self._counts = None  # a new prompt batch (prefill); decode steps add one token
        return hook

    def _gate(self, h: torch.Tensor) -> torch.Tensor:
        sae = self.sae
        feats = self.features.to(h.device)
        f = sae.encode(h.to(sae.W_dec.dtype))
        f_sel = f[..., feats]
        real = self._real.to(h.device) if self._real is not None else torch.ones(h.shape[:2], dtype=torch.bool,
                                                                                    device=h.device)
        fires = (f_sel > 0).any(-1) & real
        n_fire, n_real = fires.sum(-1).double(), real.sum(-1).double()
        if self._counts is not None:
            n_fire, n_real = n_fire + self._counts[0].to(h.device), n_real + self._counts[1].to(h.device)
        self._counts = (n_fire.cpu(), n_real.cpu())
        frac = n_fire / n_real.clamp(min=1)
        open_ = torch.ones_like(frac, dtype=torch.bool) if self.static else frac > self.tau
        self.fractions = frac.cpu().numpy()
        self.opened = open_.cpu().numpy()
        where = fires[..., None].expand_as(f_sel) if self.edit == "all_selected" else (f_sel > 0) & real[..., None]
        edit = open_[:, None, None] & where
        if not edit.any():
            return h  # a closed gate: the residual stream is not touched at all
        new_sel = torch.where(edit, torch.full_like(f_sel, self.value), f_sel)
        return h + ((new_sel - f_sel) @ sae.W_dec[feats]).to(h.dtype)

    def handles(self, model):
        blocks = decoder_layers(model)
        if self.layer >= len(blocks):
            raise ValueError(f"SAE layer {self.layer} is beyond the model's {len(blocks)} layers")
        return [blocks[self.layer].register_forward_hook(_replace_output(self._gate))]

    @contextmanager
    def applied_with(self, model, tokenizer):
        """:meth:`applied`, with the real-token mask read from each forward call's arguments."""
        self._counts, self._real = None, None
        pre = model.register_forward_pre_hook(self._capture(tokenizer), with_kwargs=True)
        try:
            with self.applied(model):
                yield
        finally:
            pre.remove()


class _BoundGuard(Intervention):
    """A guard bound to its tokenizer, usable wherever an :class:`Intervention` is."""

    def __init__(self, guard: DynamicSAEGuard, tokenizer):
        self.guard, self.tokenizer = guard, tokenizer

    @property
    def shares_prefix(self) -> bool:
        return self.guard.shares_prefix

    @contextmanager
    def applied(self, model):
        with self.guard.applied_with(model, self.tokenizer):
            yield


def bind(guard: DynamicSAEGuard, tokenizer) -> Intervention:
    return _BoundGuard(guard, tokenizer)


@torch.no_grad()
def firing_fractions(model, tokenizer, guard: DynamicSAEGuard, batches) -> np.ndarray:
    """Each sequence's firing fraction under ``guard`` with its gate shut (τ = ∞, observe only).

    ``batches`` yields ``(indices, encoded batch)`` (left-padded, as everywhere)."""
    observer = DynamicSAEGuard(guard.sae, guard.layer, guard.features, tau=float("inf"), value=guard.value)
    out: dict[int, float] = {}
    with observer.applied_with(model, tokenizer):
        for idx, enc in batches:
            model(**enc, position_ids=position_ids_from_mask(enc["attention_mask"]), use_cache=False, logits_to_keep=1)
            out.update(zip(idx, observer.fractions.tolist()))
    return np.array([out[i] for i in sorted(out)])


# ---------------------------------------------------------------------------- the refusal guardrail
@dataclass
class GatedAddition(Intervention):
    """``coeff · r`` added to resid_post of block ``layer``, where r was read, only on the batch
    rows whose prompt the gate opened on (the refusal guardrail's ``add`` action)."""

    direction: torch.Tensor
    layer: int
    coeff: float
    open_ids: frozenset[str]
    _mask: torch.Tensor | None = None
    shares_prefix = False  # rows differ

    @contextmanager
    def rows(self, prompt_ids: Sequence[str]):
        self._mask = torch.tensor([p in self.open_ids for p in prompt_ids])
        try:
            yield
        finally:
            self._mask = None

    def handles(self, model):
        block = decoder_layers(model)[self.layer]

        def add(h):
            if self._mask is None:
                raise RuntimeError("a gated intervention needs rows(prompt_ids) around each batch")
            rows = self._mask.to(h.device, h.dtype)[:, None, None]
            return h + self.coeff * rows * self.direction.to(h.device, h.dtype)

        return [block.register_forward_hook(_replace_output(add))]


def behavioural_direction(acts: torch.Tensor, refused: Sequence[bool], min_refusals: int = 5) -> torch.Tensor:
    """Per layer, the mean activation of the prompts the weights refuse minus that of the prompts
    they answer: Arditi et al.'s diff-of-means (2024, Eq. 1) with the weights' own behaviour as the
    label instead of the prompt's.

    For weights that seldom refuse, harmful-minus-harmless is a harmfulness direction that
    induces no refusal when added; this one is fitted on the few refusals they do give.
    ``acts`` is ``[n, n_layers, d_model]`` (last prompt token), ``refused`` the judge's verdicts.
    """
    mask = torch.as_tensor(np.asarray(refused, dtype=bool))
    if len(mask) != len(acts):
        raise ValueError(f"{len(acts)} activations but {len(mask)} verdicts")
    n_refused = int(mask.sum())
    if n_refused < min_refusals or n_refused == len(mask):
        raise ValueError(f"a behavioural direction needs at least {min_refusals} refused and one answered prompt; "
                         f"got {n_refused} refused of {len(mask)}")
    return acts[mask].float().mean(0) - acts[~mask].float().mean(0)


def gated_feature_set(features: FeatureSet, open_ids: Sequence[str], all_ids: Sequence[str]) -> FeatureSet:
    """A global feature set as a two-row local set: row 1 (the set) for prompts the gate opened
    on, row 0 (nothing) for the rest, so :class:`FeatureClamp` acts on opened prompts only."""
    opened = set(open_ids)
    masks = {l: torch.cat([torch.zeros_like(m[:1]), m[:1]]) for l, m in features.masks.items()}
    scale = {l: torch.cat([torch.zeros_like(s[:1]), s[:1]]) for l, s in features.scale.items()}
    return FeatureSet(masks, scale, row_of={p: int(p in opened) for p in all_ids})


def trade_off_score(table: pd.DataFrame, retain_min: float = 0.99) -> dict[str, float]:
    """Muhamed et al.'s unlearning score: 1 − the minimum forget accuracy among configs whose
    retain accuracy is at least ``retain_min`` (NaN when no config keeps the retain set)."""
    ok = table[table.retain_accuracy >= retain_min]
    if ok.empty:
        return {"score": np.nan, "n_configs_ok": 0, "best_config": None}
    best = ok.sort_values("forget_accuracy").iloc[0]
    return {"score": float(1 - best.forget_accuracy), "n_configs_ok": int(len(ok)), "best_config": best.config}


# ---------------------------------------------------------------------------- text and its scores
def read_passages(path) -> list[str]:
    """One passage per line; blank lines and ``#`` comments are skipped."""
    out = read_lines(path)
    if not out:
        raise ValueError(f"{path}: no passage")
    return out


def text_batches(tokenizer, texts: Sequence[str], batch_size: int, max_tokens: int, device="cpu"):
    """``(indices, left-padded batch)`` of plain text (BOS, no chat template), grouped by length."""
    from refusal_atlas.lm.generation import length_sorted_batches

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    seqs = [(bos + tokenizer(t, add_special_tokens=False).input_ids)[:max_tokens] for t in texts]
    for idx in length_sorted_batches([len(s) for s in seqs], batch_size):
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(seqs[i]):] = torch.tensor(seqs[i])
            mask[row, width - len(seqs[i]):] = 1
        yield idx, {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def token_scores(model, tokenizer, batches, intervention: Intervention | None = None) -> pd.DataFrame:
    """Per sequence: next-token top-1 accuracy and mean CE over its real targets (a target counts
    when the position predicting it is a real token), under ``intervention``."""
    import torch.nn.functional as nnf

    rows = []
    with (intervention or Intervention()).applied(model):
        for idx, enc in batches:
            mask = enc["attention_mask"]
            logits = model(**enc, position_ids=position_ids_from_mask(mask), use_cache=False).logits[:, :-1].float()
            target = enc["input_ids"][:, 1:]
            keep = mask[:, :-1].bool() & mask[:, 1:].bool()
            ce = nnf.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            hit = (logits.argmax(-1) == target) & keep
            n = keep.sum(-1).clamp(min=1)
            for row, i in enumerate(idx):
                rows.append({"seq": i, "accuracy": float(hit[row].sum() / n[row]),
                             "ce": float((ce[row] * keep[row]).sum() / n[row]), "tokens": int(keep[row].sum())})
    return pd.DataFrame(rows).sort_values("seq").reset_index(drop=True)


@torch.no_grad()
def text_token_acts(model, tokenizer, batches, layer: int) -> torch.Tensor:
    """``[n_tokens, d_model]`` resid_post at ``layer`` of every real, non-special token."""
    out = []
    with LayerGrab(model, [layer]) as grab:
        for _, enc in batches:
            h = grab.run(enc)[layer]
            keep = enc["attention_mask"].bool() & ~special_token_mask(tokenizer, enc["input_ids"])
            out.append(h[keep].float().cpu())
    return torch.cat(out)
