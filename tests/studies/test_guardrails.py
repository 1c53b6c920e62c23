"""Dynamic SAE guardrails: selection, tau, and the gate's guarantees on a tiny chat model."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PROMPTS, random_sae

from refusal_atlas.lm.generation import chat_batches, generate
from refusal_atlas.lm.modeling import block_hidden, decoder_layers
from refusal_atlas.studies.guardrails import (
    DynamicSAEGuard,
    GatedAddition,
    behavioural_direction,
    bind,
    calibrate_tau,
    feature_statistics,
    firing_fractions,
    select_features,
    text_batches,
    token_scores,
    trade_off_score,
)

TEXTS = PROMPTS + ["Tomatoes grow best in full sun.", "A pin tumbler lock has spring-loaded pins.",
                   "The water cycle moves water from oceans to clouds and back as rain."]


@pytest.fixture
def guard_setup(tiny):
    model, tok = tiny
    sae = random_sae(model.config.hidden_size, 64, 16, 2, seed=3, dtype="float32")
    return model, tok, sae


def fractions(model, tok, guard, texts, batch_size):
    return firing_fractions(model, tok, guard, text_batches(tok, texts, batch_size, 64))


def test_padding_does_not_change_the_firing_fraction(guard_setup):
    model, tok, sae = guard_setup
    guard = DynamicSAEGuard(sae, 2, torch.tensor([1, 4, 9, 20]))
    alone = fractions(model, tok, guard, TEXTS, batch_size=1)
    batched = fractions(model, tok, guard, TEXTS, batch_size=8)
    np.testing.assert_allclose(alone, batched, rtol=1e-6)
    assert ((alone > 0) & (alone < 1)).any()  # the check means something: fractions vary
    chat = firing_fractions(model, tok, guard, chat_batches(tok, TEXTS, 8))
    chat_alone = firing_fractions(model, tok, guard, chat_batches(tok, TEXTS, 1))
    np.testing.assert_allclose(chat, chat_alone, rtol=1e-6)


def _logits(model, tok, texts, intervention=None):
    return token_scores(model, tok, text_batches(tok, texts, 8, 64), intervention)


def test_a_closed_gate_leaves_the_model_bit_identical(guard_setup):
    model, tok, sae = guard_setup
    shut = DynamicSAEGuard(sae, 2, torch.tensor([1, 4, 9, 20]), tau=1.0)  # a fraction never exceeds 1
    base = _logits(model, tok, TEXTS)
    pd.testing.assert_frame_equal(base, _logits(model, tok, TEXTS, bind(shut, tok)))
    kw = dict(max_new_tokens=6, batch_size=8)
    assert generate(model, tok, TEXTS, **kw) == generate(model, tok, TEXTS, intervention=bind(shut, tok), **kw)
    assert not shut.opened.any()


def test_the_gate_counts_the_chat_header_in_generation(guard_setup):
    model, tok, sae = guard_setup
    feats = torch.tensor([1, 4, 9, 20])
    tau = float(np.median(firing_fractions(model, tok, DynamicSAEGuard(sae, 2, feats), chat_batches(tok, TEXTS, 8))))
    runs = []
    for share in (True, False):  # a guard opts out of the shared header: it counts whole sequences
        guard = DynamicSAEGuard(sae, 2, feats, tau=tau, value=-50.0)
        runs.append((generate(model, tok, TEXTS, max_new_tokens=3, batch_size=8, intervention=bind(guard, tok),
                              share_prefix=share), guard.fractions))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-6)


def test_the_gate_never_fires_on_a_sequence_below_tau(guard_setup):
    model, tok, sae = guard_setup
    feats = torch.tensor([1, 4, 9, 20])
    frac = fractions(model, tok, DynamicSAEGuard(sae, 2, feats), TEXTS, 8)
    tau = float(np.median(frac))
    below = frac <= tau
    assert below.any() and (~below).any()
    guard = DynamicSAEGuard(sae, 2, feats, tau=tau, value=-50.0)
    base, gated = _logits(model, tok, TEXTS), _logits(model, tok, TEXTS, bind(guard, tok))
    np.testing.assert_array_equal(base.ce[below], gated.ce[below])
    assert (base.ce[~below] != gated.ce[~below]).all()
    # the static clamp (SAEBench) edits every sequence where a latent fires
    static = _logits(model, tok, TEXTS, bind(DynamicSAEGuard(sae, 2, feats, static=True, value=-50.0), tok))
    assert (static.ce[frac > 0] != base.ce[frac > 0]).all()


def test_the_gate_edits_only_firing_tokens_and_keeps_the_error_term(guard_setup):
    model, tok, sae = guard_setup
    feats = torch.tensor([1, 4, 9, 20])
    guard = DynamicSAEGuard(sae, 2, feats, static=True, value=-7.0)
    got = {}
    block = decoder_layers(model)[2]
    enc = next(text_batches(tok, TEXTS[:1], 1, 64))[1]
    h0 = {}
    hook = block.register_forward_hook(lambda m, i, o: h0.update(h=block_hidden(o)))
    with torch.no_grad():
        model(**enc)
    hook.remove()
    with bind(guard, tok).applied(model):
        hook = block.register_forward_hook(lambda m, i, o: got.update(h=block_hidden(o)))
        with torch.no_grad():
            model(**enc)
        hook.remove()
    h = h0["h"][0]
    f = sae.encode(h)
    fires = (f[:, feats] > 0).any(-1)
    fires[0] = False  # BOS is a special token: never counted, never edited
    edited = f[:, feats].clone()
    edited[fires] = torch.where(edited[fires] > 0, torch.tensor(-7.0), edited[fires])
    expected = h + (edited - f[:, feats]) @ sae.W_dec[feats]
    torch.testing.assert_close(got["h"][0], expected, rtol=1e-5, atol=1e-5)
    assert fires.any() and (got["h"][0][~fires] == h[~fires]).all()


def test_selection_by_rho_then_f_and_tau_from_retain():
    stats = pd.DataFrame({"feature": range(6), "F": [9.0, 4.0, 1.0, 0.0, 8.0, 2.0],
                          "R": [0.0, 0.0, 0.0, 0.0, 8.0, 0.5]})
    stats["rho"] = stats.F / (stats.R + 1e-6)
    got = select_features(stats, q=50, n=2)
    # rho of live latents: 9e6, 4e6, 1e6, 1, 4 -> the cut (median) is 1e6; top-2 by F among those
    assert list(got.feature) == [0, 1] and list(got["rank"]) == [1, 2]
    assert 4 not in set(select_features(stats, q=50, n=10).feature)  # fires as much on retain
    assert calibrate_tau([0.0, 0.1, 0.2, 0.3, 1.0], 50) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="no retain"):
        calibrate_tau([])


def test_feature_statistics_follow_the_definitions(guard_setup):
    _, _, sae = guard_setup
    torch.manual_seed(0)
    forget, retain = torch.randn(50, sae.cfg.d_in), torch.randn(40, sae.cfg.d_in)
    stats = feature_statistics(sae, forget, retain, batch_size=7)
    mf = sae.encode(forget).double().mean(0).numpy()
    np.testing.assert_allclose(stats.mean_forget, mf, rtol=1e-5)
    np.testing.assert_allclose(stats.F, mf**2, rtol=1e-5)
    np.testing.assert_allclose(stats.rho, stats.F / (stats.R + 1e-6), rtol=1e-6)


def test_score_is_one_minus_the_lowest_forget_accuracy_that_keeps_retain():
    t = pd.DataFrame({"config": ["a", "b", "c"], "forget_accuracy": [0.2, 0.5, 0.9],
                      "retain_accuracy": [0.95, 0.995, 1.0]})
    assert trade_off_score(t) == {"score": 0.5, "n_configs_ok": 2, "best_config": "b"}
    assert np.isnan(trade_off_score(t, retain_min=1.01)["score"])


def test_gated_addition_acts_on_opened_prompts_only(tiny):
    model, tok = tiny
    r = torch.randn(model.config.hidden_size) * 5
    add = GatedAddition(r, 1, 1.0, frozenset({"p1"}))
    ids = ["p0", "p1", "p2"]
    texts = TEXTS[:3]
    base = generate(model, tok, texts, max_new_tokens=5, batch_size=3)
    steered = generate(model, tok, texts, max_new_tokens=5, batch_size=3, intervention=add, prompt_ids=ids)
    assert steered[0] == base[0] and steered[2] == base[2] and steered[1] != base[1]


def test_behavioural_direction_is_refused_minus_answered_per_layer():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(12, 3, 8, generator=g)
    refused = np.array([True, False, False] * 4)
    r = behavioural_direction(acts, refused, min_refusals=4)
    expected = acts[torch.tensor(refused)].mean(0) - acts[torch.tensor(~refused)].mean(0)
    assert r.shape == (3, 8) and torch.allclose(r, expected)
    # a constant shift added to the refused prompts alone is what the direction recovers
    shift = torch.randn(3, 8, generator=g)
    assert torch.allclose(behavioural_direction(acts + torch.tensor(refused)[:, None, None] * shift, refused, 4),
                          expected + shift, atol=1e-5)


@pytest.mark.parametrize("refused", [[True] * 3 + [False] * 9, [True] * 12])
def test_behavioural_direction_needs_refusals_and_answers(refused):
    with pytest.raises(ValueError, match="refused"):
        behavioural_direction(torch.zeros(12, 2, 4), refused, min_refusals=4)
    with pytest.raises(ValueError, match="verdicts"):
        behavioural_direction(torch.zeros(5, 2, 4), refused, min_refusals=1)


@pytest.mark.parametrize("edit", ["firing_only", "all_selected"])
def test_an_open_gate_edits_the_latents_its_mode_names_and_nothing_at_a_silent_token(guard_setup, edit):
    """The reference gate (all_selected) sets every selected latent to the value at each token where
    any of them fires; ours only the firing ones; neither touches a token where none fires."""
    model, _, sae = guard_setup
    torch.manual_seed(1)
    h = torch.randn(1, 2, model.config.hidden_size)
    f = sae.encode(h)
    firing, silent = f[0, 0] > 0, (f[0, 0] <= 0) & (f[0, 1] <= 0)
    a = int(torch.nonzero(firing & (f[0, 1] <= 0))[0])  # fires at token 0 only
    b, c = (int(i) for i in torch.nonzero(silent)[:2])  # fire at neither token
    guard = DynamicSAEGuard(sae, 2, torch.tensor([a, b, c]), value=-7.0, static=True, edit=edit)
    delta = guard._gate(h) - h
    assert torch.equal(delta[0, 1], torch.zeros_like(delta[0, 1]))  # a silent token is untouched
    changed = {a: -7.0 - f[0, 0, a], b: torch.tensor(-7.0), c: torch.tensor(-7.0)}
    if edit == "firing_only":
        changed = {a: changed[a]}
    expected = sum(v * sae.W_dec[i] for i, v in changed.items())
    torch.testing.assert_close(delta[0, 0], expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="firing_only or all_selected"):
        DynamicSAEGuard(sae, 2, torch.tensor([a]), edit="everything")
