"""A memory model of LA-IG (``attribution.la_ig_batch``), to size ``la_bz`` before a cluster run.

The terms follow the implementation: the model and every SAE resident in the model's dtype;
clean and patch latents and errors for every SAE layer; float32 gradient accumulators; per IG
step the interpolated leaves and their gradients; the model's saved activations for one
backward pass from the first SAE layer on. ``python bench/la_ig_memory.py`` prints the
estimate for gemma-2-2b with Gemma Scope 65k SAEs on all 26 layers at ``la_bz`` 5.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3


@dataclass
class ModelShape:
    n_params: int
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    vocab: int


# google/gemma-2-2b(-it): 2.61B parameters (config.json of the hub repository).
GEMMA_2_2B = ModelShape(n_params=2_614_341_888, n_layers=26, d_model=2304, d_mlp=9216, n_heads=8, vocab=256_000)


def sae_param_count(d_model: int, d_sae: int) -> int:
    """Parameters of one SAE: W_enc, W_dec, both biases and a threshold (JumpReLU)."""
    return 2 * d_model * d_sae + 2 * d_sae + d_model


def la_ig_memory(
    shape: ModelShape,
    *,
    d_sae: int,
    n_sae_layers: int,
    la_bz: int,
    seq_len: int,
    dtype_bytes: int = 2,
) -> dict[str, float]:
    """Estimated bytes of each term of one LA-IG batch, and the peak (their sum)."""
    bt = la_bz * seq_len
    sae_params = n_sae_layers * sae_param_count(shape.d_model, d_sae)
    latents = n_sae_layers * bt * d_sae
    errors = n_sae_layers * bt * shape.d_model
    # per layer a backward pass keeps roughly: residual and norm inputs, q/k/v/o, MLP gate/up/act,
    # attention probabilities
    saved_per_layer = bt * (8 * shape.d_model + 3 * shape.d_mlp) + la_bz * shape.n_heads * seq_len * seq_len
    terms = {
        "model": shape.n_params * dtype_bytes,
        "saes": sae_params * dtype_bytes,
        "clean_and_patch_latents": 2 * latents * dtype_bytes,
        "clean_and_patch_errors": 2 * errors * dtype_bytes,
        "grad_accumulators_fp32": (latents + errors) * 4,
        "step_leaves_and_grads": 2 * (latents + errors) * dtype_bytes,
        "saved_activations": shape.n_layers * saved_per_layer * dtype_bytes,
        "last_token_logits": 3 * la_bz * shape.vocab * 4,
    }
    terms["peak"] = sum(terms.values())
    return terms






