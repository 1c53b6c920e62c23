"""The four selectors on hand-made evidence: ordering, scopes, candidate filter."""

import pytest
import torch
from conftest import ROOT

from refusal_atlas.features.selection import FeatureEvidence, SelectionConfig, candidate_mask, select, top_features


def evidence(n_local=3, L=2, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return FeatureEvidence(
        layers=[4, 9], cos=r(L, d), global_attr=r(L, d), local_attr=r(n_local, L, d),
        max_harmful=r(L, d).abs(), max_harmless=r(L, d).abs(), mean_harmful=r(L, d), mean_harmless=r(L, d),
        local_max=r(n_local, L, d).abs(), local_ids=[f"p{i}" for i in range(n_local)],
    )


def test_top_features_ranks_over_every_layer():
    score = torch.tensor([[0.1, 5.0, 0.3], [4.0, -1.0, 6.0]])
    assert top_features(score, 3) == [(1, 2, 6.0), (0, 1, 5.0), (1, 0, 4.0)]
    mask = torch.tensor([[True, False, True], [True, True, False]])
    assert [(l, i) for l, i, _ in top_features(score, 2, mask)] == [(1, 0), (0, 2)]


def test_candidate_mask_keeps_top_k0_per_layer():
    cos = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.0, 0.2, 0.3, -0.5]])
    assert candidate_mask(cos, 2).tolist() == [[True, False, False, True], [False, True, True, False]]


@pytest.mark.parametrize("method", ["cossim", "actdiff", "ap", "la_ig"])
def test_every_method_gives_global_and_local_sets(method):
    ev = evidence()
    df = select(method, ev, SelectionConfig(k0=3, k_star=4))
    assert set(df.scope) == {"global", "local"}
    assert set(df[df.scope == "local"].prompt_id) == {"p0", "p1", "p2"}
    for _, g in df.groupby(["scope", "prompt_id"], dropna=False):
        assert list(g["rank"]) == [1, 2, 3, 4] and g.score.is_monotonic_decreasing
    assert set(df.layer) <= {4, 9}


def test_la_ig_keeps_only_cosine_candidates_and_ap_does_not():
    ev = evidence(d=40)
    cand = candidate_mask(ev.cos, 3)
    picked = lambda m: {(r.layer, r.feature) for r in select(m, ev, SelectionConfig(k0=3, k_star=5)).itertuples()}  # noqa: E731
    ours, ap = picked("la_ig"), picked("ap")
    assert all(cand[[4, 9].index(l), i] for l, i in ours)
    assert not all(cand[[4, 9].index(l), i] for l, i in ap)


def test_actdiff_scores_are_harmful_minus_harmless_max():
    ev = evidence()
    df = select("actdiff", ev, SelectionConfig(k_star=1))
    top = df[df.scope == "global"].iloc[0]
    diff = ev.max_harmful - ev.max_harmless
    assert top.score == pytest.approx(float(diff.max()))
    local = df[(df.scope == "local") & (df.prompt_id == "p1")].iloc[0]
    assert local.score == pytest.approx(float((ev.local_max[1] - ev.max_harmless).max()))


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown feature selection method"):
        select("magic", evidence(), SelectionConfig())


def test_memory_model_counts_every_sae_and_scales_with_the_batch():
    from refusal_atlas.cluster.memory import GEMMA_2_2B, la_ig_memory

    five = la_ig_memory(GEMMA_2_2B, d_sae=65_536, n_sae_layers=26, la_bz=5, seq_len=128)
    ten = la_ig_memory(GEMMA_2_2B, d_sae=65_536, n_sae_layers=26, la_bz=10, seq_len=128)
    # 26 SAEs of 2 x 2304 x 65536 weights in bf16 are ~15.7 GB whatever the batch
    assert five["saes"] == ten["saes"] == pytest.approx(26 * 2 * 2304 * 65_536 * 2, rel=1e-3)
    assert ten["clean_and_patch_latents"] == 2 * five["clean_and_patch_latents"]
    assert five["peak"] == pytest.approx(sum(v for k, v in five.items() if k != "peak"))
    assert five["peak"] < 80e9


def test_memory_measurement_runs_la_ig_on_a_random_gemma2(capsys):
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from la_ig_memory import main

    main(["--measure", "--smoke", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "measured on cpu" in out and "s/prompt" in out
