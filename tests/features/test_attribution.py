"""LA-IG on a tiny random model: completeness, gradients, alignment, and a planted feature."""

import pytest
import torch
from conftest import PROMPTS, random_sae

from refusal_atlas.features.attribution import (
    LAIGConfig,
    la_ig,
    la_ig_batch,
    logit_diff_metric,
    record_latents,
    replaced_logits,
)
from refusal_atlas.lm.interventions import DirectionalAblation, _replace_output
from refusal_atlas.lm.modeling import decoder_layers, encode_chat, last_token_logits

REFUSAL_ID = 5


@pytest.fixture
def setup(tiny):
    model, tok = tiny
    model = model.double().requires_grad_(False)
    d = model.config.hidden_size
    saes = {l: random_sae(d, 96, 8, l, seed=l) for l in range(model.config.num_hidden_layers)}
    torch.manual_seed(1)
    r = torch.randn(d, dtype=torch.float64)
    return model, tok, saes, r


def test_completeness_last_layer_approaches_patch_minus_clean(setup):
    """SAEs on every block: at α=1 the last block's output is the patch run's, so the last layer's
    attributions (errors included) sum to m(patch) - m(clean) as the number of steps grows."""
    model, tok, saes, r = setup
    enc = encode_chat(tok, PROMPTS)
    gaps = {}
    for steps in (2, 8, 64):
        b = la_ig_batch(model, saes, enc, r, REFUSAL_ID, steps)
        target = b.m_patch - b.m_clean
        gaps[steps] = (b.totals[:, -1] - target).abs().max().item()
        assert target.abs().min() > 1e-3  # the patch moves the metric on every prompt
    assert gaps[64] < gaps[8] < gaps[2]
    assert gaps[64] < 0.02 * (b.m_patch - b.m_clean).abs().max().item()


def test_completeness_single_layer_is_that_layers_patch(setup):
    """One SAE layer: the sum approaches m(layer patched, rest live) - m(clean)."""
    model, tok, saes, r = setup
    enc = encode_chat(tok, PROMPTS)
    one = {1: saes[1]}
    b = la_ig_batch(model, one, enc, r, REFUSAL_ID, steps=128)
    patch = record_latents(model, one, enc, DirectionalAblation(r))
    h_patch = one[1].decode(patch.latents[1]) + patch.errors[1]
    handle = decoder_layers(model)[1].register_forward_hook(_replace_output(lambda h: h_patch))
    try:
        with torch.no_grad():
            z = last_token_logits(model, enc)
    finally:
        handle.remove()
    m_layer = z.gather(1, b.target[:, None]).squeeze(1) - z[:, REFUSAL_ID]
    expected = m_layer - b.m_clean
    assert torch.allclose(b.totals[:, 0].double(), expected, atol=0.02 * expected.abs().max().item())


def test_gradients_match_finite_differences(setup):
    model, tok, saes, r = setup
    enc = encode_chat(tok, PROMPTS[:2])
    layers = sorted(saes)
    clean = record_latents(model, saes, enc)
    patch = record_latents(model, saes, enc, DirectionalAblation(r))
    target = patch.logits.argmax(-1)
    f = {l: torch.lerp(clean.latents[l], patch.latents[l], 0.4).requires_grad_(True) for l in layers}
    e = {l: torch.lerp(clean.errors[l], patch.errors[l], 0.4).requires_grad_(True) for l in layers}
    anchors: dict[int, torch.Tensor] = {}
    m = logit_diff_metric(replaced_logits(model, saes, enc, f, e, seen=anchors), target, REFUSAL_ID)
    grads = torch.autograd.grad(m, [f[l] for l in layers] + [e[l] for l in layers])
    assert grads[0].abs().sum() > 0  # the first layer's gradient flows through every later SAE

    def metric(fv, ev):
        with torch.no_grad():
            return logit_diff_metric(replaced_logits(model, saes, enc, fv, ev, anchors=anchors), target, REFUSAL_ID)

    gen = torch.Generator().manual_seed(0)
    eps = 1e-3  # LlamaRMSNorm computes in float32, so smaller steps drown in its rounding
    for i, l in enumerate(layers):
        for kind, vals, g in (("f", f, grads[i]), ("e", e, grads[len(layers) + i])):
            for _ in range(3):
                idx = tuple(int(torch.randint(s, (1,), generator=gen)) for s in vals[l].shape)
                if kind == "f":  # probe a latent the gradient sees strongly
                    flat = g[idx[0], -1].abs().argmax()
                    idx = (idx[0], vals[l].shape[1] - 1, int(flat))
                plus = {k: v.detach().clone() for k, v in vals.items()}
                minus = {k: v.detach().clone() for k, v in vals.items()}
                plus[l][idx] += eps
                minus[l][idx] -= eps
                other = {k: v.detach() for k, v in (e if kind == "f" else f).items()}
                args = (plus, other) if kind == "f" else (other, plus)
                args_m = (minus, other) if kind == "f" else (other, minus)
                fd = (metric(*args) - metric(*args_m)) / (2 * eps)
                assert fd.item() == pytest.approx(g[idx].item(), rel=1e-3, abs=1e-4), (kind, l, idx)


def test_per_prompt_scores_aligned_across_layers_and_batches(setup):
    """Length-sorted batching must not mix prompts up: batched rows equal single-prompt runs."""
    model, tok, saes, r = setup
    batched = la_ig(model, tok, saes, PROMPTS, r, REFUSAL_ID, cfg=LAIGConfig(steps=4, batch_size=3))
    for i, prompt in enumerate(PROMPTS):
        single = la_ig_batch(model, saes, encode_chat(tok, [prompt]), r, REFUSAL_ID, steps=4)
        # padding changes RMSNorm's float32 rounding only; another prompt's row would differ at O(1)
        assert torch.allclose(batched.scores[i], single.scores[0].float(), atol=1e-5, rtol=1e-3)
        assert torch.allclose(batched.error_scores[i], single.error_scores[0].float(), atol=1e-5, rtol=1e-3)
        assert batched.target[i] == single.target[0]


def test_planted_feature_is_ranked_first(tiny):
    """A synthetic model whose refusal logit reads r̂, carried by one SAE latent at layer 2."""
    model, tok = tiny
    model = model.double().requires_grad_(False)
    d = model.config.hidden_size
    torch.manual_seed(3)
    unit = torch.randn(d, dtype=torch.float64)
    unit /= unit.norm()
    with torch.no_grad():
        model.lm_head.weight[REFUSAL_ID] = 4.0 * unit  # tied: the refusal token reads r̂
    # The "refusal signal": every position carries r̂ from layer 0 on.
    plant = decoder_layers(model)[0].register_forward_hook(_replace_output(lambda h: h + 3.0 * unit))
    saes = {l: random_sae(d, 96, 8, l, seed=10 + l) for l in range(4)}
    planted = 17
    with torch.no_grad():
        saes[2].W_enc[:, planted] = 50.0 * unit
        saes[2].b_enc[planted] = 0.0
        saes[2].W_dec[planted] = unit
    try:
        out = la_ig(model, tok, saes, PROMPTS, unit, REFUSAL_ID, cfg=LAIGConfig(steps=8, batch_size=2))
    finally:
        plant.remove()
    glob = out.scores.mean(0)  # [L, d_sae]
    best = divmod(int(glob.argmax()), glob.shape[1])
    assert best == (2, planted)
    assert (out.scores[:, 2].argmax(-1) == planted).all()
