"""Sparse feature circuits on a tiny chat model: IG completeness, edges against finite
differences, mean ablation with the error kept, and the last token under left padding."""

import numpy as np
import pytest
import torch
from conftest import PROMPTS, random_sae

from refusal_atlas.features.attribution import record_latents, replaced_logits
from refusal_atlas.lm.modeling import encode_chat
from refusal_atlas.studies.circuits import (
    Means,
    ablated_metric,
    choose_pools,
    edge_scores,
    faithfulness,
    ig_node_scores_batch,
    node_positions,
    node_scores,
    reference_means,
    refusal_logodds,
)


@pytest.fixture
def setup(tiny):
    model, tok = tiny
    model = model.double().requires_grad_(False)
    d = model.config.hidden_size
    saes = {1: random_sae(d, 48, 8, 1, seed=1), 3: random_sae(d, 48, 8, 3, seed=3)}
    ids = [tok("I", add_special_tokens=False).input_ids[0], tok("Sorry", add_special_tokens=False).input_ids[0]]
    means = reference_means(model, tok, saes, PROMPTS, batch_size=2)
    means = Means({l: v.double() for l, v in means.latents.items()}, {l: v.double() for l, v in means.errors.items()})
    return model, tok, saes, ids, means


def test_the_metric_reads_each_prompts_last_token_under_left_padding(setup):
    model, tok, saes, ids, means = setup
    batched = ablated_metric(model, tok, saes, PROMPTS, means, ids, None, batch_size=5)
    alone = torch.cat([ablated_metric(model, tok, saes, [p], means, ids, None, batch_size=1) for p in PROMPTS])
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)
    keep_all = {l: torch.ones(48, dtype=torch.bool) for l in saes}
    # every latent kept: the spliced model is the model (the error term is kept)
    torch.testing.assert_close(ablated_metric(model, tok, saes, PROMPTS, means, ids, keep_all, batch_size=2), batched,
                               atol=1e-6, rtol=0)
    none = {l: torch.zeros(48, dtype=torch.bool) for l in saes}
    assert not torch.allclose(ablated_metric(model, tok, saes, PROMPTS, means, ids, none, batch_size=2), batched)


def test_error_nodes_outside_the_circuit_are_mean_ablated_as_marks_et_al_do(setup):
    """keep_errors: with no latent and no error node kept, every real position of the SAE layer
    carries the mean point D(f̄) + ē; with every one kept, the model is unchanged."""
    model, tok, _, ids, means = setup
    saes = {1: setup[2][1]}
    enc = encode_chat(tok, PROMPTS)
    pos = node_positions(tok, enc)
    clean = record_latents(model, saes, enc)
    f = {1: torch.where(pos[..., None], means.latents[1], clean.latents[1])}
    e = {1: torch.where(pos[..., None], means.errors[1], clean.errors[1])}
    expected = refusal_logodds(replaced_logits(model, saes, enc, f, e), ids)
    none = {1: torch.zeros(48, dtype=torch.bool)}
    ablated = ablated_metric(model, tok, saes, PROMPTS, means, ids, none, batch_size=5, keep_errors={1: False})
    torch.testing.assert_close(ablated, expected.float(), atol=1e-5, rtol=0)
    # the project's default keeps the error live: a different point
    kept = ablated_metric(model, tok, saes, PROMPTS, means, ids, none, batch_size=5)
    assert (kept - ablated).abs().max() > 1e-3
    model_itself = ablated_metric(model, tok, saes, PROMPTS, means, ids, None, batch_size=5)
    all_kept = ablated_metric(model, tok, saes, PROMPTS, means, ids, {1: torch.ones(48, dtype=torch.bool)},
                              batch_size=5, keep_errors={1: True})
    torch.testing.assert_close(all_kept, model_itself, atol=1e-6, rtol=0)


def test_ig_of_the_last_sae_layer_accounts_for_the_whole_ablation(setup):
    """At α = 1 every real position of the last SAE layer carries the means; its IEs (error node
    included) sum to m(ablated) − m(clean) as the Riemann sum refines."""
    model, tok, saes, ids, means = setup
    enc = encode_chat(tok, PROMPTS)
    pos = node_positions(tok, enc)
    scores, m_clean = ig_node_scores_batch(model, saes, enc, pos, means, ids, steps=64)
    clean = record_latents(model, saes, enc)
    f = {l: torch.where(pos[..., None], means.latents[l], clean.latents[l]) for l in saes}
    e = {l: torch.where(pos[..., None], means.errors[l], clean.errors[l]) for l in saes}
    m_ablated = refusal_logodds(replaced_logits(model, saes, enc, f, e), ids)
    torch.testing.assert_close(scores[3].sum(1), (m_ablated - m_clean).double(), atol=0.05 * float(
        (m_ablated - m_clean).abs().max()) + 1e-4, rtol=0)
    assert scores[1].shape == (len(PROMPTS), 49) and scores[1][:, :-1].abs().sum() > 0


def test_edges_sum_to_the_directional_derivative_of_the_downstream_contribution(setup):
    """Σ_u e(u→d) over every latent u of layer 1 and its error node is d's linearised contribution
    to m differentiated along the ablation of layer 1: checked by finite differences."""
    model, tok, saes, ids, means = setup
    pools = {l: np.arange(48) for l in saes}
    edges = edge_scores(model, tok, saes, PROMPTS[:2], means, ids, pools, batch_size=2)[(1, 3)]
    assert edges.shape == (2, 49, 49)
    enc = encode_chat(tok, PROMPTS[:2])
    pos = node_positions(tok, enc)
    clean = record_latents(model, saes, enc)
    f = {l: clean.latents[l].clone().requires_grad_(True) for l in saes}
    e = {l: clean.errors[l].clone().requires_grad_(True) for l in saes}
    m = refusal_logodds(replaced_logits(model, saes, enc, f, e), ids).sum()
    g3 = torch.autograd.grad(m, f[3])[0]
    j = int(edges[:, :-1].abs().sum((0, 2)).argmax())  # the downstream latent with the largest edges

    def contribution(eps: float) -> torch.Tensor:
        f1 = torch.where(pos[..., None], clean.latents[1] + eps * (means.latents[1] - clean.latents[1]), clean.latents[1])
        e1 = torch.where(pos[..., None], clean.errors[1] + eps * (means.errors[1] - clean.errors[1]), clean.errors[1])
        with torch.no_grad():
            run = record_latents(model, {3: saes[3]}, enc, _Splice(saes[1], f1, e1))
        return (run.latents[3][..., j] * g3[..., j] * pos).sum((1,))

    h = 1e-4
    fd = (contribution(h) - contribution(-h)) / (2 * h)
    torch.testing.assert_close(edges[:, j, :].sum(1).double(), fd, atol=1e-4 + 1e-3 * float(fd.abs().max()), rtol=0)


class _Splice:
    """Layer 1's output set to D(f) + e: the point at which a finite difference is taken."""

    def __init__(self, sae, f, e):
        self.sae, self.f, self.e = sae, f, e

    def applied(self, model):
        from contextlib import contextmanager

        from refusal_atlas.lm.interventions import _replace_output
        from refusal_atlas.lm.modeling import decoder_layers

        @contextmanager
        def ctx():
            h = decoder_layers(model)[1].register_forward_hook(
                _replace_output(lambda x: self.sae.decode(self.f) + self.e))
            try:
                yield
            finally:
                h.remove()

        return ctx()


def test_node_scores_and_pools(setup):
    model, tok, saes, ids, means = setup
    nodes, m = node_scores(model, tok, saes, PROMPTS, means, ids, steps=4, batch_size=2)
    assert nodes[1].shape == (5, 49) and m.shape == (5,)
    groups = {"a": {l: nodes[l][:2].mean(0).numpy() for l in saes}, "b": {l: nodes[l][2:].mean(0).numpy() for l in saes}}
    pools = choose_pools(groups, {l: nodes[l].mean(0).numpy() for l in saes}, size=10, n_top=3)
    for l in saes:
        assert len(pools[l]) == 10 and pools[l].max() < 48
        for g in groups.values():
            top = set(np.argsort(-np.abs(g[l][:-1]), kind="stable")[:3].tolist())
            assert top <= set(pools[l].tolist())
    # a pool smaller than the groups' tops keeps each group's best first
    small = choose_pools(groups, {l: nodes[l].mean(0).numpy() for l in saes}, size=2, n_top=3)
    for l in saes:
        firsts = {int(np.argsort(-np.abs(g[l][:-1]), kind="stable")[0]) for g in groups.values()}
        assert len(small[l]) == 2 and firsts <= set(small[l].tolist())


def test_faithfulness_is_the_normalised_metric():
    assert faithfulness(3.0, 1.0, 5.0) == pytest.approx(0.5)
    assert faithfulness(5.0, 1.0, 5.0) == pytest.approx(1.0)
    assert np.isnan(faithfulness(1.0, 2.0, 2.0))
