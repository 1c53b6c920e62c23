"""LA-IG: integrated-gradient attribution of SAE latents on every layer at once (Yeo et al. 2025).

Yeo et al. 2025, "Understanding Refusal in Language Models with Sparse Autoencoders", §3.2 and
ARCHITECTURE.md ("Reference algorithms"). With a clean run (latents f^c_l, errors ε^c_l) and a
patch run under directional ablation of r̂ at every layer (f^p_l, ε^p_l, target token j_b):

    m = Σ_b z[b, -1, j_b] - z[b, -1, refusal]                                   (metric)
    for α_k = k/N, k = 0..N-1, one forward pass with *every* SAE layer replaced:
        out_l = D_l(f̃_l) + ε̃_l,  f̃_l = (1-α)f^c_l + αf^p_l,  ε̃_l = (1-α)ε^c_l + αε^p_l
    g_l = mean_k ∂m/∂f̃_l                                                      (IG gradient)
    A_l[b,t,i] = (f^p_l - f^c_l)[b,t,i] · g_l[b,t,i]                            (attribution)
    s_b(l, i) = mean over the prompt's real positions after the first of A_l[b, :, i]

Gradients flow through downstream SAEs: a replaced layer passes its input's gradient on as
the identity, which is what a live ``D(E(h)) + (h - D(E(h)))`` does (Marks et al. 2024 keep the
error term live in the same way). In values every layer is replaced; in gradients each
downstream replacement is transparent. This is implemented by an anchor: the replaced output
is ``h - sg(h) + D(f̃) + ε̃``, whose value is ``D(f̃) + ε̃`` and whose Jacobian in ``h`` is I.

The reference code (github wj210/refusal_sae: ``sae_grad_patch_IG`` and ``sae_bwd_hook`` in
utils/utils.py, run by ``get_feature_attribution`` in utils/attribution_utils.py) takes another
path in values, ``path="nested"`` here. Each SAE layer re-encodes the *live* stream h_l that
upstream replacements have already moved, instead of the clean run's recorded latents:

    f̃_l = (1-α)E_l(h_l) + αf^p_l,   ε̃_l = (1-α)(h_l - D_l(E_l(h_l))) + αε^p_l,   out_l = D_l(f̃_l) + ε̃_l.

In value out_l = (1-α)h_l + α(D_l(f^p_l) + ε^p_l), whose Jacobian in h_l is (1-α)I, but the
reference's backward hook hands each hook point's output gradient to its input unchanged, so in
gradients every replaced layer is transparent, as on the stored path. The two paths then differ
only in the point at which the gradient is taken (and agree exactly with one SAE layer). The
attribution formula is the same, A_l = (f^p_l - f^c_l)·g_l with g_l the mean over α of ∂m/∂f̃_l.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_atlas.lm.generation import chat_batches
from refusal_atlas.lm.interventions import DirectionalAblation, Intervention
from refusal_atlas.lm.modeling import (
    block_hidden,
    decoder_layers,
    hook_site,
    hooks_removed,
    last_token_logits,
    template_header_length,
)
from refusal_atlas.saes.loading import hook_name

if TYPE_CHECKING:  # SAELens takes seconds to import; model-only jobs never need it
    from sae_lens import SAE


LA_IG_PATHS = ("stored", "nested")
LA_IG_POSITIONS = ("after_first", "after_header")
LA_IG_PATCH_ERRORS = ("ablated", "pre_ablation")


@dataclass
class LAIGConfig:
    """``steps`` is N of the Riemann sum; ``batch_size`` is the reference's ``la_bz``; ``path`` is
    ``stored`` (interpolate the clean and patch runs' recorded latents) or ``nested`` (the
    reference's: re-encode the live stream at every SAE layer); in both, every downstream
    replacement is transparent to the gradient.

    ``positions`` is which prompt positions a score averages over: ``after_first`` (every real
    position after the attention sink) or ``after_header`` (the reference's: after BOS and the
    template's fixed system header, :func:`~refusal_atlas.lm.modeling.template_header_length`).
    ``patch_error`` is the patch run's error term: ``ablated`` (ε^p = h^p - D(E(h^p)) of the
    ablated stream itself) or ``pre_ablation`` (the reference's: this layer's stream before its
    own ablation minus D(E(h^p)), so at α = 1 the layer's ablation is undone in value).
    """

    steps: int = 10
    batch_size: int = 5
    path: str = "stored"
    positions: str = "after_first"
    patch_error: str = "ablated"

    @classmethod
    def from_section(cls, section: Mapping) -> LAIGConfig:
        """From a ``features`` (or resolved ``categories``) config section."""
        return cls(steps=section["ig_steps"], batch_size=section["la_bz"], path=section["la_ig_path"],
                   positions=section["la_ig_positions"], patch_error=section["la_ig_patch_error"])

    def __post_init__(self):
        for name, allowed in (("path", LA_IG_PATHS), ("positions", LA_IG_POSITIONS),
                              ("patch_error", LA_IG_PATCH_ERRORS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"LA-IG {name} {getattr(self, name)!r} is not one of {allowed}")


@dataclass
class RunLatents:
    """One run's SAE latents and error terms per layer, and its last-token logits."""

    latents: dict[int, torch.Tensor]  # [B, T, d_sae]
    errors: dict[int, torch.Tensor]  # [B, T, d_model]
    logits: torch.Tensor  # [B, vocab] at the last prompt token


@torch.no_grad()
def record_latents(
    model: PreTrainedModel,
    saes: Mapping[int, SAE],
    enc: Mapping[str, torch.Tensor],
    intervention: Intervention | None = None,
    error_from_pre_intervention: bool = False,
) -> RunLatents:
    """Encode every SAE layer's resid_post (after ``intervention``, whose hooks run first).

    With ``error_from_pre_intervention`` the error term is the stream *before* this block's
    intervention hook minus ``D(f)`` (the reference's patch cache; ``LAIGConfig.patch_error``).
    """
    intervention = intervention or Intervention()
    blocks = decoder_layers(model)
    latents: dict[int, torch.Tensor] = {}
    errors: dict[int, torch.Tensor] = {}
    before: dict[int, torch.Tensor] = {}

    def keep_before(layer: int):
        def hook(_m, _i, output):
            before[layer] = block_hidden(output)

        return hook

    def make_hook(layer: int, sae: SAE):
        def hook(_m, _i, output):
            h = block_hidden(output)
            f = sae.encode(h)
            latents[layer] = f
            errors[layer] = before.pop(layer, h) - sae.decode(f)

        return hook

    with intervention.applied(model):
        handles = [blocks[layer].register_forward_hook(make_hook(layer, sae)) for layer, sae in saes.items()]
        if error_from_pre_intervention:  # prepended: they run before the intervention's hooks
            handles += [blocks[layer].register_forward_hook(keep_before(layer), prepend=True) for layer in saes]
        try:
            logits = last_token_logits(model, enc)
        finally:
            for h in handles:
                h.remove()
    if len(latents) != len(saes):
        raise RuntimeError(f"only {len(latents)} of {len(saes)} SAE hooks fired")
    return RunLatents(latents, errors, logits.to(torch.promote_types(logits.dtype, torch.float32)))


def logits_with_replaced_sites(model: PreTrainedModel, enc: Mapping[str, torch.Tensor],
                                  fns: Mapping[int | str, Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """Last-token logits (float32 or finer) with each site's activation replaced by ``fns[site]``:
    an ``int`` is that block's output (resid_post), a ``str`` a TransformerLens hook name
    (lm.modeling.hook_site; circuits use attention and MLP outputs)."""
    names = {k: k if isinstance(k, str) else hook_name(k) for k in fns}
    with hooks_removed([hook_site(model, names[k], fn) for k, fn in fns.items()]):
        logits = last_token_logits(model, enc)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def replaced_logits(
    model: PreTrainedModel,
    saes: Mapping[int, SAE],
    enc: Mapping[str, torch.Tensor],
    latents: Mapping[int, torch.Tensor],
    errors: Mapping[int, torch.Tensor],
    anchors: Mapping[int, torch.Tensor] | None = None,
    seen: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Last-token logits with every SAE layer's output set to ``D(latents) + errors``.

    ``anchors`` (default: each layer's live input, detached) fix the point at which downstream
    replacements are linearised; passing a base point's anchors gives the function whose
    derivative the IG pass computes, for finite-difference checks. ``seen`` collects the inputs.
    """
    def make_fn(layer: int, sae: SAE):
        def fn(h: torch.Tensor) -> torch.Tensor:
            if seen is not None:
                seen[layer] = h.detach()
            anchor = anchors[layer] if anchors is not None else h.detach()
            return h - anchor + sae.decode(latents[layer]) + errors[layer]

        return fn

    return logits_with_replaced_sites(model, enc, {layer: make_fn(layer, sae) for layer, sae in saes.items()})


def nested_replaced_logits(
    model: PreTrainedModel,
    saes: Mapping[int, SAE],
    enc: Mapping[str, torch.Tensor],
    patch: RunLatents,
    alpha: float,
    interpolants: dict[int, tuple[torch.Tensor, torch.Tensor]],
    seen: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Last-token logits on the reference's nested path at ``alpha`` (module docstring).

    Each layer's ``(f̃_l, ε̃_l)``, computed from its live input, goes into ``interpolants`` as
    leaves that require grad. The replaced output is ``h - sg(h) + D(f̃) + ε̃``: the reference's
    value with the reference's identity backward. ``seen`` collects each layer's live input, the
    anchor at which :func:`replaced_logits` reproduces this pass.
    """
    def make_fn(layer: int, sae: SAE):
        def fn(h: torch.Tensor) -> torch.Tensor:
            live = h.detach()
            if seen is not None:
                seen[layer] = live
            with torch.no_grad():
                f_live = sae.encode(live)
                f = torch.lerp(f_live, patch.latents[layer].to(f_live.dtype), alpha)
                e = torch.lerp(live - sae.decode(f_live), patch.errors[layer].to(live.dtype), alpha)
            f, e = f.requires_grad_(True), e.requires_grad_(True)
            interpolants[layer] = (f, e)
            return h - live + sae.decode(f) + e

        return fn

    return logits_with_replaced_sites(model, enc, {layer: make_fn(layer, sae) for layer, sae in saes.items()})


def logit_diff_metric(logits: torch.Tensor, target: torch.Tensor, refusal_id: int) -> torch.Tensor:
    """m = Σ_b z[b, j_b] - z[b, refusal] (Yeo et al. 2025, §3.2): compliance over refusal."""
    return (logits.gather(1, target[:, None]).squeeze(1) - logits[:, refusal_id]).sum()


def attribution_positions(attention_mask: torch.Tensor, skip: int = 1) -> torch.Tensor:
    """Real positions after each row's first ``skip`` (by default the first, BOS or first chat
    marker: the attention sink; the template header's length for the reference's positions)."""
    mask = attention_mask.bool()
    first = mask.long().argmax(-1)
    after = torch.arange(mask.shape[1], device=mask.device)[None, :] >= first[:, None] + skip
    return mask & after


def position_stats(latents: Mapping[int, torch.Tensor], layers: Sequence[int],
                   attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max, mean)`` ``[B, L, d_sae]`` of each latent over the positions after the first."""
    pos = attribution_positions(attention_mask)[..., None]
    n_pos = pos.sum(1).clamp(min=1)
    mx, mean = [], []
    for l in layers:
        f = latents[l].float()
        mx.append(f.masked_fill(~pos, -math.inf).amax(1))
        mean.append((f * pos).sum(1) / n_pos)
    return torch.stack(mx, 1).cpu(), torch.stack(mean, 1).cpu()


@dataclass
class BatchAttribution:
    """LA-IG on one batch; tensors are per layer in ``layers`` order."""

    layers: list[int]
    scores: torch.Tensor  # [B, L, d_sae] s_b(l, i): mean over positions after the first
    error_scores: torch.Tensor  # [B, L] the same for the error term
    totals: torch.Tensor  # [B, L] Σ over every position and latent, error included
    m_clean: torch.Tensor  # [B]
    m_patch: torch.Tensor  # [B]
    target: torch.Tensor  # [B] j_b
    latent_max: torch.Tensor  # [B, L, d_sae] clean latents over positions after the first
    latent_mean: torch.Tensor  # [B, L, d_sae]


def la_ig_batch(
    model: PreTrainedModel,
    saes: Mapping[int, SAE],
    enc: Mapping[str, torch.Tensor],
    direction: torch.Tensor,
    refusal_id: int,
    steps: int = 10,
    path: str = "stored",
    skip: int = 1,
    patch_error: str = "ablated",
) -> BatchAttribution:
    """LA-IG for one left-padded batch (see the module docstring for the equations); scores
    average over real positions after each prompt's first ``skip``."""
    LAIGConfig(path=path, patch_error=patch_error)  # validates
    layers = sorted(saes)
    saes = {layer: saes[layer] for layer in layers}
    patch = record_latents(model, saes, enc, DirectionalAblation(direction), patch_error == "pre_ablation")
    clean = record_latents(model, saes, enc)
    target = patch.logits.argmax(-1)
    acc = torch.promote_types(clean.errors[layers[0]].dtype, torch.float32)  # float32 or finer
    grad_f = {l: torch.zeros_like(clean.latents[l], dtype=acc) for l in layers}
    grad_e = {l: torch.zeros_like(clean.errors[l], dtype=acc) for l in layers}
    for k in range(steps):
        alpha = k / steps
        with torch.enable_grad():
            if path == "nested":
                interp: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
                m = logit_diff_metric(nested_replaced_logits(model, saes, enc, patch, alpha, interp), target,
                                      refusal_id)
                f = {l: interp[l][0] for l in layers}
                e = {l: interp[l][1] for l in layers}
            else:
                f = {l: torch.lerp(clean.latents[l], patch.latents[l], alpha).requires_grad_(True) for l in layers}
                e = {l: torch.lerp(clean.errors[l], patch.errors[l], alpha).requires_grad_(True) for l in layers}
                m = logit_diff_metric(replaced_logits(model, saes, enc, f, e), target, refusal_id)
            grads = torch.autograd.grad(m, [f[l] for l in layers] + [e[l] for l in layers])
        for i, l in enumerate(layers):
            grad_f[l] += grads[i].to(acc)
            grad_e[l] += grads[len(layers) + i].to(acc)
    pos = attribution_positions(enc["attention_mask"], skip).to(acc)
    n_pos = pos.sum(1).clamp(min=1)
    scores, err_scores, totals = [], [], []
    for l in layers:
        a_f = (patch.latents[l] - clean.latents[l]).to(acc) * grad_f[l] / steps
        a_e = ((patch.errors[l] - clean.errors[l]).to(acc) * grad_e[l] / steps).sum(-1)
        scores.append((a_f * pos[..., None]).sum(1) / n_pos[:, None])
        err_scores.append((a_e * pos).sum(1) / n_pos)
        totals.append(a_f.sum((1, 2)) + a_e.sum(1))
    per_prompt = lambda logits: logits.gather(1, target[:, None]).squeeze(1) - logits[:, refusal_id]  # noqa: E731
    latent_max, latent_mean = position_stats(clean.latents, layers, enc["attention_mask"])
    return BatchAttribution(
        layers=layers,
        scores=torch.stack(scores, 1).cpu(),
        error_scores=torch.stack(err_scores, 1).cpu(),
        totals=torch.stack(totals, 1).cpu(),
        m_clean=per_prompt(clean.logits).cpu(),
        m_patch=per_prompt(patch.logits).cpu(),
        target=target.cpu(),
        latent_max=latent_max,
        latent_mean=latent_mean,
    )


def la_ig(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    saes: Mapping[int, SAE],
    instructions: Sequence[str],
    direction: torch.Tensor,
    refusal_id: int,
    cfg: LAIGConfig = LAIGConfig(),
    system_prompt: str | None = None,
    desc: str = "LA-IG",
) -> BatchAttribution:
    """LA-IG for every prompt, batched by ``cfg.batch_size``, rows in ``instructions`` order."""
    device = next(model.parameters()).device
    model.requires_grad_(False)
    for sae in saes.values():
        sae.requires_grad_(False)
    layers = sorted(saes)
    n = len(instructions)
    widths = {saes[l].cfg.d_sae for l in layers}
    if len(widths) != 1:
        raise ValueError(f"SAEs of different widths {sorted(widths)} cannot share one score tensor")
    d_sae = widths.pop()
    out = BatchAttribution(
        layers=layers,
        scores=torch.zeros(n, len(layers), d_sae),
        error_scores=torch.zeros(n, len(layers)),
        totals=torch.zeros(n, len(layers)),
        m_clean=torch.zeros(n),
        m_patch=torch.zeros(n),
        target=torch.zeros(n, dtype=torch.long),
        latent_max=torch.zeros(n, len(layers), d_sae),
        latent_mean=torch.zeros(n, len(layers), d_sae),
    )
    skip = template_header_length(tokenizer, system_prompt) if cfg.positions == "after_header" else 1
    with tqdm(total=n, desc=desc, unit="prompt") as bar:
        for idx, enc in chat_batches(tokenizer, instructions, cfg.batch_size, system_prompt, device):
            b = la_ig_batch(model, saes, enc, direction, refusal_id, cfg.steps, cfg.path, skip, cfg.patch_error)
            for name in ("scores", "error_scores", "totals", "m_clean", "m_patch", "target", "latent_max",
                         "latent_mean"):
                dest = getattr(out, name)
                dest[idx] = getattr(b, name).to(dest.dtype)
            bar.update(len(idx))
    return out


@torch.no_grad()
def latent_stats(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    saes: Mapping[int, SAE],
    instructions: Sequence[str],
    *,
    batch_size: int = 16,
    system_prompt: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max, mean)`` ``[n, L, d_sae]`` of each latent over a prompt's positions after the first."""
    layers = sorted(saes)
    n, d_sae = len(instructions), saes[layers[0]].cfg.d_sae
    mx = torch.zeros(n, len(layers), d_sae)
    mean = torch.zeros(n, len(layers), d_sae)
    device = next(model.parameters()).device
    with tqdm(total=n, desc="latent stats", unit="prompt") as bar:
        for idx, enc in chat_batches(tokenizer, instructions, batch_size, system_prompt, device):
            run = record_latents(model, {l: saes[l] for l in layers}, enc)
            mx[idx], mean[idx] = position_stats(run.latents, layers, enc["attention_mask"])
            bar.update(len(idx))
    return mx, mean
