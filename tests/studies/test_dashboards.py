"""Feature dashboards: contexts, single-feature clamps and pages on a tiny chat model."""

import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PROMPTS, random_sae

from refusal_atlas.features.direction import last_token_logprobs, refusal_score
from refusal_atlas.lm.modeling import LayerGrab, encode_chat
from refusal_atlas.saes.corpus import token_mask
from refusal_atlas.steering.clamp import FeatureClamp, FeatureSet
from refusal_atlas.studies.dashboards import (
    clamp_effects,
    contrast_profile,
    highlight,
    page_name,
    render_page,
    selected_features,
    top_contexts,
)

SIX = [*PROMPTS, "Write a short story."]
BOOT = {"n_resamples": 200, "confidence": 0.95, "seed": 0}


@pytest.fixture
def setup(tiny):
    model, tok = tiny
    d = model.config.hidden_size
    saes = {1: random_sae(d, 64, 8, 1, seed=1, dtype="float32"), 3: random_sae(d, 64, 8, 3, seed=3, dtype="float32")}
    return model, tok, saes


def _busiest(saes, model, tok, layer, n=2):
    """Latents that fire on the prompts (a random SAE leaves many silent)."""
    enc = encode_chat(tok, PROMPTS)
    with LayerGrab(model, [layer]) as g, torch.no_grad():
        f = saes[layer].encode(g.run(enc)[layer])
    return torch.topk((f > 0).float().sum((0, 1)), n).indices.tolist()


def test_contexts_are_each_prompts_own_activations_whatever_the_padding(setup):
    model, tok, saes = setup
    feats = pd.DataFrame({"layer": [1, 1, 3], "feature": _busiest(saes, model, tok, 1) + _busiest(saes, model, tok, 3, 1)})
    ctx = top_contexts(model, tok, PROMPTS, saes, feats, top_k=3, batch_size=2)
    assert len(ctx) and set(zip(ctx.layer, ctx.feature)) <= set(zip(feats.layer, feats.feature))
    for (layer, feature), g in ctx.groupby(["layer", "feature"]):
        assert len(g) <= 3 and list(g.max_act) == sorted(g.max_act, reverse=True)
        for row in g.itertuples():
            # the prompt alone, unpadded: its real tokens' activations must be the ones shown
            enc = encode_chat(tok, [PROMPTS[row.prompt]])
            with LayerGrab(model, [layer]) as grab, torch.no_grad():
                f = saes[layer].encode(grab.run(enc)[layer])[0, :, feature]
            real = f[token_mask(tok, enc)[0]]
            assert len(row.tokens) == len(row.acts) == len(real)
            np.testing.assert_allclose(row.acts, real.numpy(), atol=1e-3)
            assert row.max_act == pytest.approx(float(real.max()), abs=1e-4)
            assert "".join(row.tokens).find(PROMPTS[row.prompt]) >= 0


def test_contrast_profile_counts_firing_on_safe_and_unsafe_prompts_per_type(setup):
    model, tok, saes = setup
    busy = _busiest(saes, model, tok, 1, 1)[0]
    with torch.no_grad():
        saes[1].b_enc[5] = -1e4  # never in the top k
    pairs = pd.DataFrame({"pair_id": ["a", "a", "b", "b", "c", "c"], "category": ["t1", "t1", "t1", "t1", "t2", "t2"],
                          "label": ["harmful", "harmless"] * 3, "instruction": SIX})
    feats = pd.DataFrame({"layer": [1, 1], "feature": [busy, 5]})
    prof = contrast_profile(model, tok, pairs, saes, feats, batch_size=4).set_index(["feature", "type"])
    assert set(prof.index) == {(f, t) for f in (busy, 5) for t in ("all", "t1", "t2")}
    assert prof.loc[(5, "all")].safe_fire == 0 and prof.loc[(5, "all")].unsafe_fire == 0
    assert prof.loc[(5, "all")].top_safe_act == 0
    assert prof.loc[(busy, "t1")].n_pairs == 2 and prof.loc[(busy, "t2")].n_pairs == 1
    with LayerGrab(model, [1]) as g, torch.no_grad():
        fired = [bool((saes[1].encode(g.run(encode_chat(tok, [p]))[1])[0, :, busy]
                       [token_mask(tok, encode_chat(tok, [p]))[0]] > 0).any()) for p in SIX]
    assert prof.loc[(busy, "all")].safe_fire == pytest.approx(np.mean(fired[1::2]))
    assert prof.loc[(busy, "all")].unsafe_fire == pytest.approx(np.mean(fired[0::2]))
    assert prof.loc[(busy, "t2")].top_safe == SIX[5]


def test_a_feature_that_never_fires_has_no_context(setup):
    model, tok, saes = setup
    with torch.no_grad():
        saes[1].b_enc[5] = -1e4  # never in the top k
    ctx = top_contexts(model, tok, PROMPTS, saes, pd.DataFrame({"layer": [1], "feature": [5]}), top_k=3)
    assert ctx.empty


def test_a_feature_without_its_sae_is_an_error(setup):
    model, tok, saes = setup
    with pytest.raises(ValueError, match="no SAE"):
        top_contexts(model, tok, PROMPTS, saes, pd.DataFrame({"layer": [2], "feature": [0]}), top_k=1)


def test_clamping_one_feature_is_measured_against_the_unclamped_model(setup):
    model, tok, saes = setup
    busy = _busiest(saes, model, tok, 3, 2)
    feats = pd.DataFrame({"layer": [3, 3], "feature": busy})
    ids = [tok("I", add_special_tokens=False).input_ids[0]]
    same = clamp_effects(model, tok, PROMPTS, saes, feats, 1.0, ids, BOOT, batch_size=2)
    np.testing.assert_allclose(same.delta_refusal_score, 0.0, atol=1e-4)  # c = 1 changes nothing

    eff = clamp_effects(model, tok, PROMPTS, saes, feats, -5.0, ids, BOOT, batch_size=2, reference=feats)
    alone = eff[eff.set == "alone"]
    assert list(alone.feature) == busy and (alone.n == len(PROMPTS)).all()
    base = refusal_score(last_token_logprobs(model, tok, PROMPTS), ids)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, busy[0]] = True
    clamp = FeatureClamp({3: saes[3]}, FeatureSet({3: mask}, {3: torch.ones(1, 64)}), value=-5.0)
    expected = (refusal_score(last_token_logprobs(model, tok, PROMPTS, intervention=clamp), ids) - base).mean()
    assert alone.delta_refusal_score.iloc[0] == pytest.approx(float(expected), abs=1e-4)
    assert abs(alone.delta_refusal_score.iloc[0]) > 1e-3
    ref = eff[eff.set == "reference"].iloc[0]
    assert ref.ci_low <= ref.delta_refusal_score <= ref.ci_high and ref.n == len(PROMPTS)


def _table(rows, protocol):
    return pd.DataFrame([{"scope": "global", "prompt_id": None, "rank": r, "layer": l, "feature": f, "score": 1.0 / r,
                          "cos_r": 0.1 * f, "mean_act_harmful": 2.0 if protocol == "heldout" else 9.0,
                          "mean_act_harmless": 1.0, "max_act_harmful": 3.0, "max_act_harmless": 2.0,
                          "protocol": protocol} for r, (l, f) in enumerate(rows, start=1)])


def test_the_dashboards_cover_the_union_of_every_selected_set():
    tables = {
        "la_ig": pd.concat([_table([(1, 5), (2, 7)], "heldout"), _table([(3, 1), (1, 5)], "transductive"),
                            _table([(9, 9)], "heldout").assign(scope="local", prompt_id="p")]),
        "cossim": _table([(2, 7), (3, 4)], "heldout"),
    }
    feats, ranks = selected_features(tables)
    assert set(zip(feats.layer, feats.feature)) == {(1, 5), (2, 7), (3, 1), (3, 4)}  # local sets are not shown
    f = feats.set_index(["layer", "feature"])
    assert f.loc[(1, 5), "n_sets"] == 2 and f.loc[(1, 5), "best_rank"] == 1
    assert f.loc[(2, 7), "n_sets"] == 2 and f.loc[(3, 4), "best_rank"] == 2
    # facts come from the held-out evidence where the feature has it, else from what selected it
    assert f.loc[(1, 5), "facts_protocol"] == "heldout" and f.loc[(1, 5), "mean_act_harmful"] == 2.0
    assert f.loc[(3, 1), "facts_protocol"] == "transductive" and f.loc[(3, 1), "mean_act_harmful"] == 9.0
    assert len(ranks) == 6


def test_a_page_is_self_contained_and_escapes_prompt_text():
    feats, ranks = selected_features({"la_ig": _table([(1, 5)], "heldout")})
    contexts = pd.DataFrame([{"layer": 1, "feature": 5, "prompt": 0, "max_act": 4.0,
                              "tokens": ["<script>alert(1)</script>", " ok"], "acts": [4.0, 1.0]}])
    prompts = pd.DataFrame([{"instruction": "x", "label": "harmful", "split": "val", "variant": "plain"}])
    meta = {"model": "m", "promptset": "bundled", "sae_source": "train", "d_sae": {1: 64}, "n_sets": 1, "k_star": 1,
            "layer_star": 1, "fit_splits": {"heldout": "train"}, "top_k": 1, "n_prompts": 1, "effect_split": "val",
            "confidence": 0.95, "reference_name": "la_ig heldout F*", "reference_size": 1, "effect_features": "reference"}
    effect = {"value": -3.0, "delta_refusal_score": -0.5, "ci_low": -0.7, "ci_high": -0.3, "n": 8}
    page = render_page(feats.iloc[0].to_dict(), ranks, contexts, prompts, effect, effect, meta)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "LA-IG" in page and "-0.500" in page and "layer 1 · feature 5" in page
    assert 'rgba(220, 80, 30, 1.00)' in page and 'rgba(220, 80, 30, 0.25)' in page  # shaded by act / peak
    contrast = pd.DataFrame([{"type": "homonym", "n_pairs": 9, "safe_fire": 0.78, "unsafe_fire": 0.89, "safe_peak": 2.0,
                              "unsafe_peak": 3.0, "top_safe": "How do I <b>kill</b> a process?", "top_safe_act": 3.5}])
    typed = render_page(feats.iloc[0].to_dict(), ranks, contexts, prompts, effect, effect,
                        {**meta, "contrast": "contrast", "contrast_split": "test"}, contrast)
    assert "homonym" in typed and "0.78" in typed and "&lt;b&gt;kill" in typed
    assert "look unsafe" not in page
    empty = render_page(feats.iloc[0].to_dict(), ranks, contexts.iloc[:0], prompts, None, None, meta)
    assert "never fired" in empty and "Not computed" in empty
    assert page_name(3, 12, 456) == "003-L12-F456.html"


def test_highlight_keeps_newlines_visible():
    assert "↵<br>" in highlight(["a\n"], [1.0], 1.0)
