"""The SAE feature clamp and the feature sets it clamps (Yeo et al. 2025, §3.3 "Intervention").

Clamp (ARCHITECTURE.md): ``f = E(h)``, ``ε = h − D(f)``, modify ``f[..., S_l]``, then
``h ← D(f') + ε``; the error term is always kept. It is computed as ``h + D(f') − D(f)``, which is
the same value and leaves ``h`` bit-identical when nothing changes (c = 1). Condition names (the
``{method}`` wildcard) are parsed in :mod:`refusal_atlas.steering.conditions`.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from refusal_atlas.lm.generation import chat_batches
from refusal_atlas.lm.interventions import Intervention, _replace_output
from refusal_atlas.lm.modeling import LayerGrab, decoder_layers, last_token_logits

if TYPE_CHECKING:  # SAELens takes seconds to import; model-only jobs never need it
    from sae_lens import SAE


# ---------------------------------------------------------------------------- feature sets
@dataclass
class FeatureSet:
    """Selected latents per layer: one row for a global set, one row per prompt for local sets.

    ``masks[l]`` is ``[rows, d_sae]`` bool; ``scale[l]`` is ``[rows, d_sae]``, the mean max
    activation on harmful prompts of each selected latent (the unit of the ``set`` mode).
    ``row_of`` maps a prompt id to its row (local sets); global sets have one row for all.
    """

    masks: dict[int, torch.Tensor]
    scale: dict[int, torch.Tensor]
    row_of: dict[str, int] | None = None

    @property
    def size(self) -> int:
        return int(sum(m.sum() for m in self.masks.values())) // max(1, self.n_rows)

    @property
    def n_rows(self) -> int:
        return next(iter(self.masks.values())).shape[0] if self.masks else 1

    def rows_for(self, prompt_ids: Sequence[str]) -> list[int]:
        if self.row_of is None:
            return [0] * len(prompt_ids)
        missing = [p for p in prompt_ids if p not in self.row_of]
        if missing:
            raise ValueError(
                f"{len(missing)} prompts have no local feature set (e.g. {missing[0]!r}); local sets exist "
                "only for the eval-split harmful prompts of the feature promptset"
            )
        return [self.row_of[p] for p in prompt_ids]


def table_rows(table: pd.DataFrame, protocol: str, scope: str, k_star: int) -> pd.DataFrame:
    rows = table[(table.protocol == protocol) & (table.scope == scope) & (table["rank"] <= k_star)]
    if rows.empty:
        raise ValueError(f"the feature table has no {scope} {protocol} sets")
    if rows.groupby("prompt_id", dropna=False)["rank"].max().max() < k_star:
        raise ValueError(f"K*={k_star} is larger than the selected sets (features.k_star)")
    return rows


def feature_set(table: pd.DataFrame, protocol: str, scope: str, k_star: int, d_sae: Mapping[int, int]) -> FeatureSet:
    """The top-``k_star`` of a ``select_features`` table (top-k sets are prefixes of larger ones)."""
    rows = table_rows(table, protocol, scope, k_star)
    keys = [None] if scope == "global" else sorted(rows.prompt_id.unique())
    row_of = None if scope == "global" else {p: i for i, p in enumerate(keys)}
    masks = {l: torch.zeros(len(keys), d, dtype=torch.bool) for l, d in d_sae.items()}
    scale = {l: torch.zeros(len(keys), d) for l, d in d_sae.items()}
    for r in rows.itertuples():
        if r.layer not in masks:
            raise ValueError(f"feature at layer {r.layer} has no SAE among layers {sorted(d_sae)}")
        i = 0 if row_of is None else row_of[r.prompt_id]
        masks[r.layer][i, r.feature] = True
        scale[r.layer][i, r.feature] = r.max_act_harmful
    return FeatureSet(masks, scale, row_of)


def random_feature_set(like: FeatureSet, live: Mapping[int, torch.Tensor], scale: Mapping[int, torch.Tensor],
                       seed: int) -> FeatureSet:
    """The random control: per row and layer, as many latents as ``like`` holds, drawn uniformly
    from the live latents (``live[l]`` bool ``[d_sae]``) that ``like`` did not pick.

    Dead latents are excluded because clamping a latent that never fires changes nothing, which
    would make the control look better than chance.
    """
    gen = torch.Generator().manual_seed(seed)
    masks, scales = {}, {}
    for l, m in like.masks.items():
        out = torch.zeros_like(m)
        for i in range(m.shape[0]):
            n = int(m[i].sum())
            pool = torch.nonzero(live[l] & ~m[i]).flatten()
            if n > len(pool):
                raise ValueError(f"layer {l}: {n} random features asked for, {len(pool)} live latents left")
            out[i, pool[torch.randperm(len(pool), generator=gen)[:n]]] = True
        masks[l] = out
        scales[l] = scale[l].float().expand_as(out) * out
    return FeatureSet(masks, scales, like.row_of)


# ---------------------------------------------------------------------------- the clamp
@dataclass
class FeatureClamp(Intervention):
    """Clamp selected SAE latents at each hooked layer's resid_post, at every position.

    ``mode="multiply"`` sets ``f_i ← c · f_i``; ``mode="set"`` sets ``f_i ← v · scale_i``. With a
    local set, ``rows(...)`` chooses each batch row's set; a global set applies to every row.
    ``record=True`` keeps the last modified latents per layer (for tests and dashboards).
    """

    saes: Mapping[int, SAE]
    features: FeatureSet
    mode: str = "multiply"
    value: float = 1.0
    record: bool = False
    last: dict[int, torch.Tensor] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)
    _rows: list[int] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("multiply", "set"):
            raise ValueError(f"unknown clamp mode {self.mode!r}; use multiply or set")
        missing = set(self.features.masks) - set(self.saes)
        if missing:
            raise ValueError(f"no SAE for layers {sorted(missing)}")
        # Only the latents some row selects can change: the hook encodes once and decodes the
        # change of those few latents, D(f') - D(f) = (f' - f)[S] W_dec[S], where the decoder is
        # affine (no activation normalisation), instead of decoding f and f' in full.
        self._sel = {l: m.any(0).nonzero().squeeze(-1) for l, m in self.features.masks.items()}
        self._affine = {l: getattr(sae.cfg, "normalize_activations", "none") in ("none", None)
                        for l, sae in self.saes.items()}
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def shares_prefix(self) -> bool:
        return self.features.row_of is None  # a local set differs by row

    @contextmanager
    def rows(self, prompt_ids: Sequence[str]) -> Iterator[None]:
        self._rows = self.features.rows_for(prompt_ids)
        try:
            yield
        finally:
            self._rows = None

    def _row_params(self, layer: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The selected latents' indices, and each row's mask and scale over them."""
        key = (layer, str(device))
        if key not in self._cache:
            sel = self._sel[layer]
            self._cache[key] = (sel.to(device), self.features.masks[layer][:, sel].to(device),
                                self.features.scale[layer][:, sel].to(device))
        sel, mask, scale = self._cache[key]
        if self.features.row_of is None:
            return sel, mask[:, None, :], scale[:, None, :]
        if self._rows is None or len(self._rows) != batch:
            raise RuntimeError("a local feature set needs rows(prompt_ids) around each batch")
        idx = torch.tensor(self._rows, device=device)
        return sel, mask[idx][:, None, :], scale[idx][:, None, :]

    def _clamp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        sae = self.saes[layer]
        return h + self._change(layer, h, sae.encode(h.to(sae.dtype))).to(h.dtype)

    def _change(self, layer: int, h: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """``D(f') - D(f)`` of the clamp at ``layer``, for ``f = E(h)``."""
        sae = self.saes[layer]
        sel, mask, scale = self._row_params(layer, h.shape[0], h.device)
        f_sel = f[..., sel]
        target = f_sel * self.value if self.mode == "multiply" else (self.value * scale).to(f.dtype).expand_as(f_sel)
        new_sel = torch.where(mask, target, f_sel)
        self.calls[layer] = self.calls.get(layer, 0) + 1
        affine = self._affine[layer]
        if self.record or not affine:
            f_new = f.clone()
            f_new[..., sel] = new_sel
            if self.record:
                self.last[layer] = f_new.detach()
            if not affine:
                return sae.decode(f_new) - sae.decode(f)
        return (new_sel - f_sel) @ sae.W_dec[sel]

    def handles(self, model):
        blocks = decoder_layers(model)
        out = []
        for layer in sorted(self.features.masks):
            if layer >= len(blocks):
                raise ValueError(f"SAE layer {layer} is beyond the model's {len(blocks)} layers")
            out.append(blocks[layer].register_forward_hook(_replace_output(lambda h, l=layer: self._clamp(l, h))))
        return out


@dataclass
class PinnedFeatureClamp(FeatureClamp):
    """A :class:`FeatureClamp` that also holds ``pinned`` latents at their clean values on the
    prompt's positions: Yeo et al. 2025 §4.2 as their code runs it (``clamp_sae`` with
    ``retain_feats``: the specific clamp pins the common set, the common clamp the specific one),
    so that one set's effect cannot pass through the other set's latents downstream. Generated
    tokens are not pinned, as in the reference. Fill ``clean`` with :meth:`record_clean` first.

    The edit is ``h + Σ (f'_S - f_S) W_dec[S]`` over the clamped and the pinned latents, which is
    ``D(f') + ε`` for the affine decoders this needs; the two sets must not overlap.
    """

    pinned: FeatureSet | None = None
    clean: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # id -> layer -> [T, |pin|]
    _ids: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pinned is None:
            raise ValueError("a pinned clamp needs the pinned FeatureSet")
        missing = set(self.pinned.masks) - set(self.saes)
        if missing:
            raise ValueError(f"no SAE for pinned layers {sorted(missing)}")
        self._pin = {l: m.any(0).nonzero().squeeze(-1) for l, m in self.pinned.masks.items() if m.any()}
        for l, pin in self._pin.items():
            if not self._affine[l]:
                raise ValueError(f"layer {l}: pinning latents needs an SAE without activation normalisation")
            if l in self._sel and bool(torch.isin(pin, self._sel[l]).any()):
                raise ValueError(f"layer {l}: the clamped and the pinned sets share latents")

    @property
    def shares_prefix(self) -> bool:
        return False  # each row's prompt positions must line up with its recorded clean values

    @contextmanager
    def rows(self, prompt_ids: Sequence[str]) -> Iterator[None]:
        self._ids = list(prompt_ids)
        try:
            with super().rows(prompt_ids):
                yield
        finally:
            self._ids = None

    @torch.no_grad()
    def record_clean(self, model, tokenizer, instructions: Sequence[str], prompt_ids: Sequence[str], *,
                     system_prompt: str | None = None, batch_size: int = 16) -> None:
        """The pinned latents of an unclamped pass over each prompt, at its real positions."""
        layers = sorted(self._pin)
        device = next(model.parameters()).device
        for idx, enc in chat_batches(tokenizer, instructions, batch_size, system_prompt, device):
            with LayerGrab(model, layers) as grab:
                last_token_logits(model, enc)
            real = enc["attention_mask"].bool()
            for l in layers:
                sae = self.saes[l]
                f = sae.encode(grab.out[l].to(sae.dtype))[..., self._pin[l].to(device)]
                for row, i in enumerate(idx):
                    self.clean.setdefault(prompt_ids[i], {})[l] = f[row, real[row]].cpu()

    def _clamp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        if layer not in self._pin or h.shape[1] == 1:
            return super()._clamp(layer, h) if layer in self._sel else h
        if self._ids is None or len(self._ids) != h.shape[0]:
            raise RuntimeError("a pinned clamp needs rows(prompt_ids) around each batch")
        sae, pin = self.saes[layer], self._pin[layer].to(h.device)
        f_all = sae.encode(h.to(sae.dtype))  # once, for the clamp's change and the pin's
        out = h + self._change(layer, h, f_all).to(h.dtype) if layer in self._sel else h
        f = f_all[..., pin]
        target = f.clone()
        for b, pid in enumerate(self._ids):
            if pid not in self.clean:
                raise KeyError(f"no clean latents recorded for prompt {pid!r}: call record_clean first")
            c = self.clean[pid][layer]
            target[b, h.shape[1] - c.shape[0]:] = c.to(target)  # left padding: the prompt ends the row
        mask = self.pinned.masks[layer][self.pinned.rows_for(self._ids)][:, pin.cpu()].to(h.device)
        target = torch.where(mask[:, None, :], target, f)
        if self.record:  # the clamp's own record of this pass, or a fresh one on a pinned-only layer
            base = self.last[layer] if layer in self._sel else f_all.detach().clone()
            base[..., pin] = target.detach()
            self.last[layer] = base
        return out + ((target - f) @ sae.W_dec[pin]).to(h.dtype)

    def handles(self, model):
        blocks = decoder_layers(model)
        extra = sorted(set(self._pin) - set(self.features.masks))
        return super().handles(model) + [
            blocks[l].register_forward_hook(_replace_output(lambda h, l=l: self._clamp(l, h))) for l in extra]


def stable_shard(ids: Sequence[str], n_shards: int) -> np.ndarray:
    """A prompt's shard from its id alone, so shards do not move when a prompt set grows."""
    return np.array([int(hashlib.sha256(i.encode()).hexdigest()[:8], 16) % n_shards for i in ids], dtype=int)
