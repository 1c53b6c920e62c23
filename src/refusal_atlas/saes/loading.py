"""SAELens SAEs on the residual stream (and, for circuits, the attention and MLP outputs): where each
reads, and loading them from disk or the hub."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # SAELens takes seconds to import; model-only jobs never need it
    from sae_lens import SAE


HOOK_TEMPLATE = "blocks.{layer}.hook_resid_post"


def hook_name(layer: int) -> str:
    return HOOK_TEMPLATE.format(layer=layer)


def hook_layer(sae: SAE) -> int:
    """The decoder block whose output (resid_post) ``sae`` reads; anything else is refused."""
    name = sae.cfg.metadata.hook_name or ""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", name)
    if m is None:
        raise ValueError(f"refusal-atlas hooks SAEs on resid_post; this SAE reads {name!r}")
    return int(m.group(1))


def site_of(sae: SAE) -> tuple[int, str]:
    """``(layer, submodule)`` that ``sae`` reads (resid, attn or mlp; lm.modeling.SITE_HOOKS)."""
    from refusal_atlas.lm.modeling import parse_hook

    layer, submodule, _ = parse_hook(sae.cfg.metadata.hook_name)
    return layer, submodule


def check_fits(sae: SAE, layer: int, d_model: int | None, what: str, model: str, submodule: str = "resid") -> None:
    """An SAE is used only where it was trained: this layer's resid_post (or ``submodule``'s
    output), at the model's width."""
    if submodule != "resid":
        from refusal_atlas.lm.modeling import parse_hook

        try:
            read, kind, hook = parse_hook(sae.cfg.metadata.hook_name)
        except ValueError as e:
            raise ValueError(f"SAE {what}: {e}") from None
        if (read, kind) != (layer, submodule):
            raise ValueError(f"SAE {what} reads {sae.cfg.metadata.hook_name}, but is configured for layer {layer}'s "
                             f"{submodule} of model {model}")
        # hook_z is the heads' concatenation, whose width is not the stream's
        if hook != "attn.hook_z" and d_model is not None and sae.cfg.d_in != d_model:
            raise ValueError(f"SAE {what} has d_in {sae.cfg.d_in}, but model {model}'s residual stream is {d_model} "
                             "wide: it was trained on another model")
        return
    try:
        read = hook_layer(sae)
    except ValueError as e:
        raise ValueError(f"SAE {what}: {e} ({hook_name(layer)} for layer {layer} of model {model})") from None
    if read != layer:
        raise ValueError(f"SAE {what} reads layer {read} ({sae.cfg.metadata.hook_name}), but is configured for "
                         f"layer {layer} of model {model}")
    if d_model is not None and sae.cfg.d_in != d_model:
        raise ValueError(f"SAE {what} has d_in {sae.cfg.d_in}, but model {model}'s residual stream is {d_model} "
                         "wide: it was trained on another model")


def load_sae(path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None) -> SAE:
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(path), device=str(device), dtype=dtype)
    sae.requires_grad_(False)
    if getattr(sae, "hook_z_reshaping_mode", False):  # hook_z is read flat, as the o_proj input
        sae.turn_off_forward_pass_hook_z_reshaping()
    return sae.eval()


def load_pretrained_sae(release: str, sae_id: str, device: str = "cpu", dtype: str = "float32") -> SAE:
    """An SAE from a SAELens release (Gemma Scope, Llama Scope...), with a clear error if unknown."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise ValueError(f"unknown SAELens release {release!r}; see sae_lens's pretrained_saes.yaml")
    if sae_id not in directory[release].saes_map:
        sample = sorted(directory[release].saes_map)[:5]
        raise ValueError(f"release {release!r} has no SAE {sae_id!r} (e.g. {sample})")
    from sae_lens import SAE

    from refusal_atlas.core.hub import require_cached

    entry = directory[release]
    require_cached(entry.repo_id, what=f"SAE {release}/{sae_id}", subfolders=[entry.saes_map[sae_id]])
    sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    # Llama Scope's conversion hands back transposed views, which safetensors refuses to save.
    for param in sae.parameters():
        param.data = param.data.contiguous()
    return sae
