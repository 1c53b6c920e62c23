"""Sparse feature circuits of refusal (Marks et al. 2024, "Sparse Feature Circuits"), per prompt.

Metric: the refusal score at the last prompt token, m_b = logit(Σ_{j∈R} p_b(j)) (Arditi et al.
2024, §C), R the refusal first tokens. Rows are left-padded, so the last prompt token is at
index −1 of every row.

Nodes are the latents of every SAE site plus one error node ε_s per site. A site is a layer's
resid_post, or (``Site``, Marks et al.'s submodules) its attention or MLP output: each SAE is hooked
where its TransformerLens hook name says (lm.modeling.hook_site). A node's score is
its integrated-gradient indirect effect against mean ablation (Marks et al. §2, Eq. 3 with IG):

    IE_b(a) = Σ_{t∈P_b} (ā - a_t) · (1/N) Σ_{k<N} ∂m_b/∂a |_{a_t + (k/N)(ā - a_t)}

with every SAE site interpolated at once (downstream SAEs pass gradients on as the identity,
as in LA-IG: attribution.replaced_logits), ā the node's mean over the reference prompts and P_b
the prompt's real, non-special positions (chat markers hold the attention sink and are never
ablated). Edges join a node u of site s to a node d of a later site s' (``edge_pairs``: the next
SAE layer's resid, or with submodules each later submodule of the layer and the previous resid
into each, the paths through the submodules between them stopped) by attribution patching
(Marks et al. §2, Eq. 6, at the clean point):

    e_b(u→d) = Σ_{t∈P_b} (ū - u_t) · ∂(Σ_{t'∈P_b} ∇_{d_t'} m_b · d_t')/∂u_t

the gradient of d's linearised contribution to m taken through the model between s and s', with
the SAE of s spliced in and its error term live. Scores are kept per prompt, so a circuit
of any group of prompts (a category, or a permutation of the labels) is their mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from refusal_atlas.features.attribution import logits_with_replaced_sites
from refusal_atlas.lm.generation import chat_batches
from refusal_atlas.lm.modeling import hook_site, hooks_removed, last_token_logits, special_token_mask
from refusal_atlas.saes.loading import hook_name

if TYPE_CHECKING:
    from sae_lens import SAE


def refusal_logodds(logits: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """``[B]`` m_b = log p(R) - log(1 - p(R)) from last-token logits (differentiable)."""
    lp = torch.log_softmax(logits.float(), -1)
    lr = torch.logsumexp(lp[:, list(refusal_ids)], -1)
    return lr - torch.log1p(-lr.exp().clamp(max=1 - 1e-6))


def node_positions(tokenizer, enc: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[B, T]`` the positions whose latents are scored and ablated: real and not special."""
    return enc["attention_mask"].bool() & ~special_token_mask(tokenizer, enc["input_ids"])


@dataclass(frozen=True, order=True)
class Site:
    """Where an SAE reads: layer ``layer``'s ``submodule`` (attn, mlp or resid: alphabetical is the
    order they run in). Plain ``int`` keys elsewhere in this module mean ``Site(layer)``."""

    layer: int
    submodule: str = "resid"

    @property
    def name(self) -> str:
        """Its key in the scores file: the bare layer for resid, as files without submodules had."""
        return str(self.layer) if self.submodule == "resid" else f"{self.submodule}{self.layer}"

    @property
    def label(self) -> str:
        return f"L{self.layer}" if self.submodule == "resid" else f"L{self.layer}.{self.submodule}"


def as_site(key: int | Site) -> Site:
    return key if isinstance(key, Site) else Site(int(key))


def _hook_name(key, sae: SAE) -> str:
    name = getattr(sae.cfg.metadata, "hook_name", None)
    if name:
        return name
    if as_site(key).submodule != "resid":
        raise ValueError(f"the SAE for {as_site(key).label} names no hook_name")
    return hook_name(as_site(key).layer)


def _hooked(model, saes: Mapping, fns: Mapping, replace: bool = True) -> list:
    return [hook_site(model, _hook_name(k, saes[k]), fn, replace=replace) for k, fn in fns.items()]


@dataclass
class Recorded:
    """Each site's latents and error term (its input minus the reconstruction), and the logits."""

    latents: dict
    errors: dict
    logits: torch.Tensor


@torch.no_grad()
def record_sites(model, saes: Mapping, enc) -> Recorded:
    """Encode the activation every SAE reads in one clean pass."""
    latents, errors = {}, {}

    def make(k, sae):
        def fn(h):
            f = sae.encode(h)
            latents[k], errors[k] = f, h - sae.decode(f)
        return fn

    with hooks_removed(_hooked(model, saes, {k: make(k, s) for k, s in saes.items()}, replace=False)):
        logits = last_token_logits(model, enc)
    return Recorded(latents, errors, logits)


def spliced_logits(model, saes: Mapping, enc, latents: Mapping, errors: Mapping) -> torch.Tensor:
    """Last-token logits with every site set to ``D(latents) + errors``, passing gradients on to
    its input as the identity (as LA-IG's attribution.replaced_logits does for resid_post)."""
    def make(k, sae):
        return lambda h: h - h.detach() + sae.decode(latents[k]) + errors[k]

    return logits_with_replaced_sites(model, enc, {_hook_name(k, s): make(k, s) for k, s in saes.items()})


def edge_pairs(keys) -> list[tuple]:
    """``(up, down, cut)`` for every edge Marks et al. (§2, App. A) score: within a layer each
    submodule into every later one, and the previous SAE layer's resid into each, the paths through
    the submodules ``cut`` between them stopped. Resid alone: consecutive layers, nothing cut."""
    by_layer: dict[int, list] = {}
    for k in sorted(keys):
        by_layer.setdefault(as_site(k).layer, []).append(k)
    out, prev = [], None
    for ks in by_layer.values():
        for j, d in enumerate(ks):
            if prev is not None:
                out.append((prev, d, tuple(ks[:j])))
            out += [(ks[i], d, tuple(ks[i + 1:j])) for i in range(j)]
        prev = next((k for k in ks if as_site(k).submodule == "resid"), prev)
    return out


@dataclass
class Means:
    """The mean-ablation point: each latent's and each error dimension's mean per SAE layer."""

    latents: dict  # site -> [d_sae]
    errors: dict  # site -> [d_in]


@torch.no_grad()
def reference_means(model, tokenizer, saes: Mapping, instructions: Sequence[str], batch_size: int = 16,
                    system_prompt: str | None = None) -> Means:
    """Means over every real, non-special position of ``instructions`` (Marks et al.'s ā)."""
    device = next(model.parameters()).device
    sums_f = {l: torch.zeros(s.cfg.d_sae, dtype=torch.float64) for l, s in saes.items()}
    sums_e: dict[int, torch.Tensor] = {}
    count = 0
    for _, enc in chat_batches(tokenizer, list(instructions), batch_size, system_prompt, device):
        run = record_sites(model, saes, enc)
        pos = node_positions(tokenizer, enc)
        count += int(pos.sum())
        for l in saes:
            sums_f[l] += run.latents[l][pos].double().sum(0).cpu()
            e = run.errors[l][pos].double().sum(0).cpu()
            sums_e[l] = sums_e.get(l, 0) + e
    if count == 0:
        raise ValueError("no real token to take the ablation means over")
    return Means({l: (v / count).float() for l, v in sums_f.items()}, {l: (v / count).float() for l, v in sums_e.items()})


class _Stop(Exception):
    pass


def _grads(model, saes: Mapping, enc, f: Mapping, e: Mapping,
           refusal_ids: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """m and its gradients in every site's latents and errors, all SAEs spliced at once."""
    layers = sorted(saes)
    f = {l: f[l].detach().requires_grad_(True) for l in layers}
    e = {l: e[l].detach().requires_grad_(True) for l in layers}
    with torch.enable_grad():
        m = refusal_logodds(spliced_logits(model, saes, enc, f, e), refusal_ids)
        grads = torch.autograd.grad(m.sum(), [f[l] for l in layers] + [e[l] for l in layers])
    return m.detach(), list(grads[:len(layers)]), list(grads[len(layers):])


def _patch(clean, means: Means, pos: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = pos[..., None]
    f = torch.where(mask, means.latents[layer].to(clean.latents[layer]), clean.latents[layer])
    e = torch.where(mask, means.errors[layer].to(clean.errors[layer]), clean.errors[layer])
    return f, e


def ig_node_scores_batch(model, saes: Mapping, enc, pos: torch.Tensor, means: Means,
                         refusal_ids: Sequence[int], steps: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """``{l: [B, d_sae + 1]}`` IG indirect effects of every latent and (last) the error node, and m."""
    layers = sorted(saes)
    clean = record_sites(model, saes, enc)
    patch = {l: _patch(clean, means, pos, l) for l in layers}
    acc = torch.float64 if clean.errors[layers[0]].dtype == torch.float64 else torch.float32
    grad_f = {l: torch.zeros_like(clean.latents[l], dtype=acc) for l in layers}
    grad_e = {l: torch.zeros_like(clean.errors[l], dtype=acc) for l in layers}
    m_clean = None
    for k in range(steps):
        alpha = k / steps
        m, gf, ge = _grads(model, saes, enc, {l: torch.lerp(clean.latents[l], patch[l][0], alpha) for l in layers},
                           {l: torch.lerp(clean.errors[l], patch[l][1], alpha) for l in layers}, refusal_ids)
        m_clean = m if k == 0 else m_clean
        for i, l in enumerate(layers):
            grad_f[l] += gf[i].to(acc)
            grad_e[l] += ge[i].to(acc)
    mask = pos[..., None]
    out = {}
    for l in layers:
        f_ie = ((patch[l][0] - clean.latents[l]).to(acc) * grad_f[l] / steps * mask).sum(1)
        e_ie = ((patch[l][1] - clean.errors[l]).to(acc) * grad_e[l] / steps * mask).sum((1, 2))
        out[l] = torch.cat([f_ie, e_ie[:, None]], 1)
    return out, m_clean


def edge_scores_batch(model, saes: Mapping, enc, pos: torch.Tensor, means: Means, clean,
                      grads_f: Mapping, grads_e: Mapping, up, down, up_pool: np.ndarray, down_pool: np.ndarray,
                      cut: Sequence = ()) -> torch.Tensor:
    """``[B, len(down_pool) + 1, len(up_pool) + 1]`` attribution-patching edges from site ``up``
    to site ``down`` (error nodes last), at the clean point, the paths through ``cut`` stopped."""
    sae_u, sae_d = saes[up], saes[down]
    f_u = clean.latents[up].detach().clone().requires_grad_(True)
    e_u = clean.errors[up].detach().clone().requires_grad_(True)
    grabbed = {}

    def splice(h):
        return h - h.detach() + sae_u.decode(f_u) + e_u

    def grab(h):
        grabbed["h"] = h
        raise _Stop

    fns = {up: splice, **{k: (lambda h: h.detach()) for k in cut}}
    with hooks_removed(_hooked(model, saes, fns) + _hooked(model, saes, {down: grab}, replace=False)), \
            torch.enable_grad():
        try:  # the blocks above ``down`` are not needed
            last_token_logits(model, enc)
        except _Stop:
            pass
        h = grabbed["h"]
        f_d = sae_d.encode(h)
        e_d = h - sae_d.decode(f_d)
    mask = pos[..., None]
    delta_f, delta_e = (p - c for p, c in zip(_patch(clean, means, pos, up), (f_u.detach(), e_u.detach())))
    up_idx = torch.as_tensor(up_pool, dtype=torch.long, device=f_u.device)
    g_f, g_e = grads_f[down], grads_e[down]
    targets = [(f_d[..., j] * g_f[..., j] * pos).sum() for j in down_pool.tolist()]
    targets.append((e_d * g_e * mask).sum())
    out = torch.zeros(f_u.shape[0], len(targets), len(up_pool) + 1)
    for r, target in enumerate(targets):
        gf, ge = torch.autograd.grad(target, [f_u, e_u], retain_graph=r < len(targets) - 1, allow_unused=True)
        if gf is not None:
            out[:, r, :-1] = (delta_f * gf).sum(1)[:, up_idx].float().cpu()
        if ge is not None:
            out[:, r, -1] = (delta_e * ge).sum((1, 2)).float().cpu()
    return out


def node_scores(model, tokenizer, saes: Mapping, instructions: Sequence[str], means: Means,
                refusal_ids: Sequence[int], *, steps: int = 5, batch_size: int = 8, system_prompt: str | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Per-prompt IE ``{l: [n, d_sae + 1]}`` of every latent and the error node, and ``[n]`` clean m."""
    device = next(model.parameters()).device
    model.requires_grad_(False)
    for sae in saes.values():
        sae.requires_grad_(False)
    n = len(instructions)
    out = {l: torch.zeros(n, s.cfg.d_sae + 1, dtype=dtype) for l, s in saes.items()}
    m_clean = torch.zeros(n)
    with tqdm(total=n, desc="node IE", unit="prompt") as bar:
        for idx, enc in chat_batches(tokenizer, list(instructions), batch_size, system_prompt, device):
            pos = node_positions(tokenizer, enc)
            scores, m = ig_node_scores_batch(model, saes, enc, pos, means, refusal_ids, steps)
            m_clean[idx] = m.float().cpu()
            for l in saes:
                out[l][idx] = scores[l].to(dtype).cpu()
            bar.update(len(idx))
    return out, m_clean


def edge_scores(model, tokenizer, saes: Mapping, instructions: Sequence[str], means: Means,
                refusal_ids: Sequence[int], pools: Mapping, *, batch_size: int = 8,
                system_prompt: str | None = None) -> dict[tuple, torch.Tensor]:
    """Per-prompt edges ``{(u, d): [n, |pool_d| + 1, |pool_u| + 1]}`` for every pair of
    :func:`edge_pairs` (consecutive SAE layers when there is only resid)."""
    device = next(model.parameters()).device
    layers = sorted(saes)
    pairs = edge_pairs(layers)
    n = len(instructions)
    out = {(a, b): torch.zeros(n, len(pools[b]) + 1, len(pools[a]) + 1) for a, b, _ in pairs}
    with tqdm(total=n, desc="edges", unit="prompt") as bar:
        for idx, enc in chat_batches(tokenizer, list(instructions), batch_size, system_prompt, device):
            pos = node_positions(tokenizer, enc)
            clean = record_sites(model, saes, enc)
            _, gf, ge = _grads(model, saes, enc, clean.latents, clean.errors, refusal_ids)
            grads_f, grads_e = dict(zip(layers, gf)), dict(zip(layers, ge))
            for a, b, cut in pairs:
                out[(a, b)][idx] = edge_scores_batch(model, saes, enc, pos, means, clean, grads_f, grads_e, a, b,
                                                     pools[a], pools[b], cut)
            bar.update(len(idx))
    return out


def choose_pools(group_means: Mapping[str, Mapping[int, np.ndarray]], overall: Mapping[int, np.ndarray],
                 size: int, n_top: int) -> dict[int, np.ndarray]:
    """At most ``size`` candidate latents per layer: first those in some group's top ``n_top`` by
    |mean IE| (best rank in any group first), then the top of ``overall`` (|mean IE| over all
    prompts). Error columns (last) are excluded."""
    pools = {}
    for l, tot in overall.items():
        best: dict[int, int] = {}
        for g in group_means.values():
            for rank, i in enumerate(np.argsort(-np.abs(np.asarray(g[l])[:-1]), kind="stable")[:n_top]):
                best[int(i)] = min(best.get(int(i), rank), rank)
        ranked = sorted(best, key=lambda i: (best[i], i))
        order = [int(i) for i in np.argsort(-np.abs(np.asarray(tot)[:-1]), kind="stable") if int(i) not in best]
        pools[l] = np.array(sorted((ranked + order)[:size]), dtype=np.int64)
    return pools


# ---------------------------------------------------------------------------- faithfulness
def ablated_metric(model, tokenizer, saes: Mapping, instructions: Sequence[str], means: Means,
                   refusal_ids: Sequence[int], keep: Mapping | None, *, batch_size: int = 16,
                   system_prompt: str | None = None, keep_errors: Mapping | None = None) -> torch.Tensor:
    """``[n]`` m with every latent outside ``keep[l]`` (bool ``[d_sae]``) mean-ablated at the real,
    non-special positions of every SAE layer. ``keep=None``: the model itself.

    Error terms stay live unless ``keep_errors`` is given: then layer l's error node, unless
    ``keep_errors[l]``, is mean-ablated too, as Marks et al. 2024 (§3.1) treat it as a node.
    """
    device = next(model.parameters()).device
    out = torch.zeros(len(instructions))
    state = {}

    def make(layer: int, sae):
        def fn(h):
            f = sae.encode(h.to(sae.dtype))
            ablate = state["pos"][..., None] & ~keep[layer].to(h.device)
            f_new = torch.where(ablate, means.latents[layer].to(f), f)
            out = h + ((f_new - f) @ sae.W_dec).to(h.dtype)
            if keep_errors is not None and not keep_errors[layer]:
                error = h - sae.decode(f).to(h.dtype)
                out = torch.where(state["pos"][..., None], out - error + means.errors[layer].to(h), out)
            return out
        return fn

    with torch.no_grad():
        for idx, enc in chat_batches(tokenizer, list(instructions), batch_size, system_prompt, device):
            state["pos"] = node_positions(tokenizer, enc)
            handles = _hooked(model, saes, {l: make(l, s) for l, s in saes.items()}) if keep is not None else []
            with hooks_removed(handles):
                out[idx] = refusal_logodds(last_token_logits(model, enc), refusal_ids).float().cpu()
    return out


def faithfulness(m_circuit: float, m_empty: float, m_model: float) -> float:
    """(m(C) - m(∅)) / (m(M) - m(∅)) (Marks et al. §3.1); completeness passes m(M \\ C) as m(C)."""
    denom = m_model - m_empty
    return float("nan") if abs(denom) < 1e-9 else (m_circuit - m_empty) / denom
