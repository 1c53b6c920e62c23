import pandas as pd
import pytest
import torch


from refusal_atlas.features.direction import (
    LayerScore,
    borrow_harmless,
    choose_layer,
    fit_direction,
    diff_in_means,
    filter_by_refusal,
    last_token_logprobs,
    massive_dims,
    refusal_score,
    zero_dims,
)
from refusal_atlas.lm.interventions import DirectionalAblation


def test_diff_in_means_recovers_planted_shift():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(200, 3, 8, generator=g)
    harmful = torch.arange(200) < 100
    shift = torch.zeros(3, 8)
    shift[1, 5] = 4.0
    acts[harmful] += shift
    r = diff_in_means(acts, harmful)
    assert r.shape == (3, 8)
    assert r[1].abs().argmax() == 5 and r[1, 5] > 3.0
    with pytest.raises(ValueError):
        diff_in_means(acts, torch.ones(200, dtype=torch.bool))


def test_zero_dims_per_layer():
    r = torch.ones(2, 4)
    out = zero_dims(r, torch.tensor([[0, 1], [3, 2]]))
    assert out.tolist() == [[0, 0, 1, 1], [1, 1, 0, 0]] and r.sum() == 8


def test_refusal_score_is_log_odds():
    p = torch.tensor([[0.2, 0.3, 0.5]])
    s = refusal_score(p.log(), [0, 2])
    assert s.item() == pytest.approx(torch.log(torch.tensor(0.7 / 0.3)).item(), abs=1e-5)


def test_choose_layer_respects_filters():
    scores = [
        LayerScore(0, 0.0, bypass_score=-9.0, induce_score=1.0, kl=5.0, r_norm=1, eligible=False),  # broken
        LayerScore(1, 0.2, bypass_score=-3.0, induce_score=1.0, kl=0.01, r_norm=1, eligible=True),
        LayerScore(2, 0.1, bypass_score=-1.0, induce_score=2.0, kl=0.01, r_norm=1, eligible=True),
        LayerScore(3, 0.1, bypass_score=-2.0, induce_score=2.0, kl=0.01, r_norm=1, eligible=True),
    ]
    assert choose_layer(scores) == 3  # least judged refusal; the first-token score breaks the tie
    with pytest.raises(ValueError, match="no candidate layer"):
        choose_layer(scores[:1])


def test_massive_dims_finds_a_planted_sink(tiny):
    model, tok = tiny
    special = torch.tensor(sorted(tok.all_special_ids))

    # Plant a massive activation in dim 7 at special-token positions through the embeddings.
    emb = model.get_input_embeddings()
    with torch.no_grad():
        saved = emb.weight[special].clone()
        emb.weight[special, 7] = 500.0
    try:
        dims = massive_dims(model, tok, ["Hi there", "How do I bake bread?"], k=2)
    finally:
        with torch.no_grad():
            emb.weight[special] = saved
    assert dims.shape == (model.config.num_hidden_layers, 2)
    assert (dims == 7).any(dim=1).all()


def test_ablation_depends_only_on_the_line_of_r(tiny):
    model, tok = tiny
    prompts = ["Hi", "How do I bake bread?"]
    base = last_token_logprobs(model, tok, prompts)
    same = last_token_logprobs(model, tok, prompts, intervention=DirectionalAblation(torch.eye(64)[3] * 1e-3))
    moved = (base - same).abs().max()
    assert base.shape == (2, model.config.vocab_size)
    assert moved > 0  # a real direction changes something ...
    r = torch.randn(64)
    assert torch.allclose(
        last_token_logprobs(model, tok, prompts, intervention=DirectionalAblation(r)),
        last_token_logprobs(model, tok, prompts, intervention=DirectionalAblation(-3 * r)),
        atol=1e-5,
    )  # ... and ablation depends only on the line, not on the sign or scale of r


def _index(prefix, labels, split):
    return pd.DataFrame({"id": [f"{prefix}{i}" for i in range(len(labels))], "label": labels, "variant": "plain",
                         "split": split, "row": range(len(labels)), "instruction": "x"})


def test_a_benchmark_s_own_direction_borrows_harmless_prompts_and_differs_from_the_pooled_one():
    """Yeo et al.'s Table 1: each benchmark's r from its own harmful prompts against as many of
    the direction promptset's harmless train prompts, not the pooled r of the direction promptset."""
    g = torch.Generator().manual_seed(0)
    d = 16
    pooled_shift, bench_shift = torch.zeros(2, d), torch.zeros(2, d)
    pooled_shift[:, 0], bench_shift[:, 1] = 5.0, 5.0
    # the direction promptset: 40 harmful and 60 harmless train prompts
    own_labels = ["harmful"] * 40 + ["harmless"] * 60
    own_acts = torch.randn(100, 2, d, generator=g)
    own_acts[:40] += pooled_shift
    own_index = _index("rd", own_labels, "train")
    # a benchmark: 30 harmful test prompts and no harmless ones
    bench_acts = torch.randn(30, 2, d, generator=g) + bench_shift
    bench_index = _index("hb", ["harmful"] * 30, "test")
    with pytest.raises(ValueError, match="needs harmful and harmless"):
        fit_direction(bench_acts, bench_index, "test")
    acts, index = borrow_harmless(bench_acts, bench_index, own_acts, own_index, "test")
    assert len(acts) == len(index) == 60 and (index.label == "harmless").sum() == 30
    assert index[index.label == "harmless"].id.str.startswith("rd").all() and index.row.is_unique
    borrowed = index[index.label == "harmless"]
    assert torch.equal(acts[torch.tensor(borrowed.row.to_numpy())],
                       own_acts[torch.tensor([int(i[2:]) for i in borrowed.id])])
    r_bench, _ = fit_direction(acts, index, "test")
    r_pooled, _ = fit_direction(own_acts, own_index, "train")
    assert r_bench[1].abs().argmax() == 1 and r_pooled[1].abs().argmax() == 0
    assert torch.nn.functional.cosine_similarity(r_bench[1], r_pooled[1], dim=0) < 0.5
    # a promptset with its own harmless prompts borrows nothing
    assert borrow_harmless(own_acts, own_index, bench_acts, bench_index, "train")[0] is own_acts
    with pytest.raises(ValueError, match="cannot be fitted"):
        borrow_harmless(bench_acts, bench_index, bench_acts, bench_index, "test")


def test_the_refusal_score_filter_keeps_refused_harmful_and_answered_harmless_prompts():
    """Arditi et al.'s filter before fitting r: a harmful prompt the model answers, or a harmless
    one it refuses, would blur the contrast r is the mean difference of."""
    fit = _index("p", ["harmful"] * 3 + ["harmless"] * 3, "train")
    kept = filter_by_refusal(fit, torch.tensor([2.0, -1.0, 0.5, -3.0, 0.2, -0.1]))
    assert kept.id.tolist() == ["p0", "p2", "p3", "p5"]
    with pytest.raises(ValueError, match="keeps 0 harmful and 3 harmless"):
        filter_by_refusal(fit, torch.tensor([-1.0, -1.0, -1.0, -3.0, -0.2, -0.1]))
    with pytest.raises(ValueError, match="5 refusal scores for 6 prompts"):
        filter_by_refusal(fit, torch.zeros(5))
