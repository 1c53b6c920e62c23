"""LA-IG on a tiny random model: completeness, gradients, alignment, and a planted feature."""

import pytest
import torch
from conftest import PROMPTS, random_sae

from refusal_atlas.features.attribution import (
    LAIGConfig,
    attribution_positions,
    la_ig,
    la_ig_batch,
    logit_diff_metric,
    nested_replaced_logits,
    record_latents,
    replaced_logits,
)
from refusal_atlas.lm.interventions import DirectionalAblation, _replace_output
from refusal_atlas.lm.modeling import decoder_layers, encode_chat, last_token_logits, template_header_length

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


def _clean_and_patch(model, saes, enc, r):
    """The clean run, the patch run under directional ablation, and the patch's target tokens."""
    patch = record_latents(model, saes, enc, DirectionalAblation(r))
    return record_latents(model, saes, enc), patch, patch.logits.argmax(-1)


def test_gradients_match_finite_differences(setup):
    model, tok, saes, r = setup
    enc = encode_chat(tok, PROMPTS[:2])
    layers = sorted(saes)
    clean, patch, target = _clean_and_patch(model, saes, enc, r)
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


def _nested(model, saes, enc, patch, target, alpha, **kw):
    interp: dict = {}
    m = logit_diff_metric(nested_replaced_logits(model, saes, enc, patch, alpha, interp, **kw), target, REFUSAL_ID)
    return m, interp


def test_nested_path_gradients_are_those_of_its_linearisation_and_match_finite_differences(setup):
    """The reference's path: every layer re-encodes the live stream. Its gradients equal those of
    replaced_logits at the nested pass's own interpolants and anchors, and central differences of
    that function (every later replacement linearised at the pass, as the reference's backward
    hook makes it) agree with them."""
    model, tok, saes, r = setup
    enc = encode_chat(tok, PROMPTS[:2])
    layers = sorted(saes)
    clean, patch, target = _clean_and_patch(model, saes, enc, r)
    anchors: dict = {}
    with torch.enable_grad():
        m, interp = _nested(model, saes, enc, patch, target, 0.4, seen=anchors)
        grads = torch.autograd.grad(m, [interp[l][0] for l in layers] + [interp[l][1] for l in layers])
    f = {l: interp[l][0].detach().clone().requires_grad_(True) for l in layers}
    e = {l: interp[l][1].detach().clone().requires_grad_(True) for l in layers}
    # the live stream is not the clean one past the first replaced layer: a different point
    assert not torch.allclose(f[layers[-1]], torch.lerp(clean.latents[layers[-1]], patch.latents[layers[-1]], 0.4))
    with torch.enable_grad():
        m_lin = logit_diff_metric(replaced_logits(model, saes, enc, f, e, anchors=anchors), target, REFUSAL_ID)
        lin = torch.autograd.grad(m_lin, [f[l] for l in layers] + [e[l] for l in layers])
    assert torch.allclose(m_lin, m)
    for g, g_lin in zip(grads, lin):
        assert torch.allclose(g, g_lin, rtol=1e-9, atol=1e-12)

    def metric(fv):
        with torch.no_grad():
            ev = {k: v.detach() for k, v in e.items()}
            return logit_diff_metric(replaced_logits(model, saes, enc, fv, ev, anchors=anchors), target, REFUSAL_ID)

    eps = 1e-3  # LlamaRMSNorm computes in float32 (see above)
    for i, l in enumerate(layers):
        for b in range(2):
            idx = (b, enc["input_ids"].shape[1] - 1, int(grads[i][b, -1].abs().argmax()))
            plus = {k: v.detach().clone() for k, v in f.items()}
            minus = {k: v.detach().clone() for k, v in f.items()}
            plus[l][idx] += eps
            minus[l][idx] -= eps
            fd = (metric(plus) - metric(minus)) / (2 * eps)
            assert fd.item() == pytest.approx(grads[i][idx].item(), rel=1e-3, abs=1e-4), (l, idx)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7])
def test_a_nested_layer_is_1_minus_alpha_in_value_and_transparent_in_gradient(setup, alpha):
    """The reference's replacement D((1-α)E(h) + αf^p) + (1-α)(h - D(E(h))) + αε^p has the
    Jacobian (1-α)I in h, which would scale the gradient reaching layer l by (1-α) per later
    replaced layer; its backward hook passes the output's gradient to the input unchanged, and so
    does the nested path: the factor between two replaced layers is 1."""
    model, tok, saes, r = setup
    enc = encode_chat(tok, PROMPTS[:3])
    layers = sorted(saes)
    patch = record_latents(model, saes, enc, DirectionalAblation(r))
    target = patch.logits.argmax(-1)
    live: dict = {}
    with torch.no_grad():
        _nested(model, saes, enc, patch, target, alpha, seen=live)
    l = layers[1]
    sae = saes[l]
    h = live[l].clone().requires_grad_(True)
    out = sae.decode(torch.lerp(sae.encode(h), patch.latents[l], alpha)) + torch.lerp(
        h - sae.decode(sae.encode(h)), patch.errors[l], alpha)
    g = torch.randn_like(out)
    (jac_t_g,) = torch.autograd.grad(out, h, g)
    assert torch.allclose(jac_t_g, (1 - alpha) * g, rtol=1e-9, atol=1e-12)  # the value's Jacobian
    # the nested path: the gradient at the replaced layer's input h_l (block l's own output, seen
    # by a hook that runs before the replacement) equals the one at its output, ∂m/∂ε̃_l
    ins: dict = {}
    grab = decoder_layers(model)[l].register_forward_hook(
        lambda m_, i_, o_: ins.__setitem__(l, o_[0] if isinstance(o_, tuple) else o_), prepend=True)
    try:
        with torch.enable_grad():
            m, interp = _nested(model, saes, enc, patch, target, alpha)
            g_in, g_out = torch.autograd.grad(m, [ins[l], interp[l][1]])
    finally:
        grab.remove()
    assert g_out.abs().max() > 0
    assert torch.allclose(g_in, g_out, rtol=1e-9, atol=1e-12)


def test_nested_and_stored_paths_agree_on_one_layer_and_differ_on_several(setup):
    """With one SAE layer nothing upstream is replaced, so the live stream is the clean one and the
    two paths are the same computation; with several, the live re-encoding moves the point at which
    later layers' gradients are taken, and the scores change."""
    model, tok, saes, r = setup
    enc = encode_chat(tok, PROMPTS)
    one = {2: saes[2]}
    stored, nested = (la_ig_batch(model, one, enc, r, REFUSAL_ID, 4, path=p) for p in ("stored", "nested"))
    assert torch.allclose(stored.scores, nested.scores, rtol=1e-9, atol=1e-12)
    assert torch.allclose(stored.error_scores, nested.error_scores, rtol=1e-9, atol=1e-12)
    stored, nested = (la_ig_batch(model, saes, enc, r, REFUSAL_ID, 4, path=p) for p in ("stored", "nested"))
    first = stored.layers.index(0)
    gap = (stored.scores[:, first] - nested.scores[:, first]).abs().max()
    assert gap > 1e-3 * stored.scores[:, first].abs().max()
    with pytest.raises(ValueError, match="LA-IG path 'live' is not one of"):
        LAIGConfig(path="live")


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


def test_the_pre_ablation_patch_error_undoes_this_layer_s_ablation_in_value(setup):
    """The reference's patch cache: ε^p = h(before this layer's ablation) - D(E(h^p)), so
    D(f^p) + ε^p exceeds the ablated stream by exactly the r̂ component the ablation removed."""
    model, tok, saes, r = setup
    enc = encode_chat(tok, PROMPTS[:3])
    ablated = record_latents(model, saes, enc, DirectionalAblation(r))
    reference = record_latents(model, saes, enc, DirectionalAblation(r), error_from_pre_intervention=True)
    unit = r / r.norm()
    before: dict[int, torch.Tensor] = {}
    hooks = [decoder_layers(model)[l].register_forward_hook(
        lambda _m, _i, out, l=l: before.__setitem__(l, out[0] if isinstance(out, tuple) else out), prepend=True)
        for l in saes]
    try:
        with DirectionalAblation(r).applied(model), torch.no_grad():
            last_token_logits(model, enc)
    finally:
        for h in hooks:
            h.remove()
    for l, sae in saes.items():
        assert torch.equal(reference.latents[l], ablated.latents[l])  # latents of the ablated stream
        h_p = sae.decode(ablated.latents[l]) + ablated.errors[l]
        h_ref = sae.decode(reference.latents[l]) + reference.errors[l]
        removed = (before[l] @ unit)[..., None] * unit
        assert removed.abs().max() > 1e-3
        assert torch.allclose(h_ref - h_p, removed, atol=1e-9)


def test_header_positions_leave_the_template_header_out_of_every_score(setup):
    model, tok, saes, r = setup
    enc = encode_chat(tok, PROMPTS)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert attribution_positions(mask, 3).tolist() == [[False] * 5 + [True], [False] * 3 + [True] * 3]
    assert attribution_positions(mask).tolist() == [[False] * 3 + [True] * 3, [False] + [True] * 5]
    one = {1: saes[1]}
    every = la_ig_batch(model, one, enc, r, REFUSAL_ID, 4, skip=0)
    n_all = enc["attention_mask"].sum(1).double()
    # with nothing skipped, the means times n are the totals: every position is in the score
    assert torch.allclose((every.scores[:, 0].double().sum(-1) + every.error_scores[:, 0]) * n_all,
                          every.totals[:, 0].double(), atol=1e-8)
    first = la_ig_batch(model, one, enc, r, REFUSAL_ID, 4)
    header = la_ig_batch(model, one, enc, r, REFUSAL_ID, 4, skip=3)
    assert torch.equal(first.totals, header.totals)
    assert not torch.allclose(first.scores, header.scores)


@pytest.mark.parametrize("positions", ["after_first", "after_header"])
def test_la_ig_reads_the_header_length_from_the_template(setup, monkeypatch, positions):
    model, tok, saes, r = setup
    seen = []
    real = la_ig_batch

    def spy(*args, **kw):
        seen.append(args[7])
        return real(*args, **kw)

    monkeypatch.setattr("refusal_atlas.features.attribution.la_ig_batch", spy)
    la_ig(model, tok, {1: saes[1]}, PROMPTS[:2], r, REFUSAL_ID, LAIGConfig(steps=2, positions=positions),
          system_prompt="Be brief.")
    header = template_header_length(tok, "Be brief.")
    assert header > 3  # the system block
    assert set(seen) == {header if positions == "after_header" else 1}


def test_la_ig_config_rejects_an_unknown_mode():
    for kw in ({"path": "x"}, {"positions": "last"}, {"patch_error": "x"}):
        with pytest.raises(ValueError, match="is not one of"):
            LAIGConfig(**kw)
