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
    Site,
    ablated_metric,
    choose_pools,
    edge_pairs,
    edge_scores,
    faithfulness,
    ig_node_scores_batch,
    node_positions,
    node_scores,
    record_sites,
    reference_means,
    refusal_logodds,
    spliced_logits,
)


@pytest.fixture
def setup(tiny):
    model, tok = tiny
    model = model.double().requires_grad_(False)
    d = model.config.hidden_size
    saes = {1: random_sae(d, 48, 8, 1, seed=1), 3: random_sae(d, 48, 8, 3, seed=3)}
    return _with_means(model, tok, saes)


def _with_means(model, tok, saes):
    ids = [tok("I", add_special_tokens=False).input_ids[0], tok("Sorry", add_special_tokens=False).input_ids[0]]
    means = reference_means(model, tok, saes, PROMPTS, batch_size=2)
    means = Means({k: v.double() for k, v in means.latents.items()}, {k: v.double() for k, v in means.errors.items()})
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
    scores = _last_site_ig_is_complete(model, tok, saes, ids, means, 3)
    assert scores[1].shape == (len(PROMPTS), 49) and scores[1][:, :-1].abs().sum() > 0


def _last_site_ig_is_complete(model, tok, saes, ids, means, last):
    enc = encode_chat(tok, PROMPTS)
    pos = node_positions(tok, enc)
    scores, m_clean = ig_node_scores_batch(model, saes, enc, pos, means, ids, steps=64)
    clean = record_sites(model, saes, enc)
    f = {k: torch.where(pos[..., None], means.latents[k], clean.latents[k]) for k in saes}
    e = {k: torch.where(pos[..., None], means.errors[k], clean.errors[k]) for k in saes}
    m_ablated = refusal_logodds(spliced_logits(model, saes, enc, f, e), ids)
    torch.testing.assert_close(scores[last].sum(1), (m_ablated - m_clean).double(), atol=0.05 * float(
        (m_ablated - m_clean).abs().max()) + 1e-4, rtol=0)
    return scores


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


# ---------------------------------------------------------------------------- Marks et al.'s submodules
def test_edges_follow_marks_et_al_s_submodule_graph():
    a1, m1, r1, a3, m3, r3 = (Site(1, "attn"), Site(1, "mlp"), Site(1), Site(3, "attn"), Site(3, "mlp"), Site(3))
    assert edge_pairs([r3, a1, m3, r1, a3, m1]) == [
        (a1, m1, ()), (a1, r1, (m1,)), (m1, r1, ()),
        (r1, a3, ()), (r1, m3, (a3,)), (a3, m3, ()), (r1, r3, (a3, m3)), (a3, r3, (m3,)), (m3, r3, ())]
    assert edge_pairs([5, 1, 3]) == [(1, 3, ()), (3, 5, ())]  # resid alone: consecutive layers
    assert [s.name for s in (a1, r3)] == ["attn1", "3"] and Site(2, "mlp").label == "L2.mlp"


@pytest.fixture
def sites(tiny):
    """Layer 1's three submodules (attention read at hook_z, before its output projection) and
    layer 3's attention output and resid."""
    model, tok = tiny
    model = model.double().requires_grad_(False)
    d, cfg = model.config.hidden_size, model.config
    d_z = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads)
    saes = {Site(1, "attn"): random_sae(d_z, 40, 8, 1, seed=11, hook="attn.hook_z"),
            Site(1, "mlp"): random_sae(d, 40, 8, 1, seed=12, hook="hook_mlp_out"),
            Site(1): random_sae(d, 48, 8, 1, seed=1),
            Site(3, "attn"): random_sae(d, 40, 8, 3, seed=13, hook="hook_attn_out"),
            Site(3): random_sae(d, 48, 8, 3, seed=3)}
    return _with_means(model, tok, saes)


def test_submodule_saes_splice_exactly_and_their_ig_accounts_for_the_ablation(sites):
    model, tok, saes, ids, means = sites
    model_itself = ablated_metric(model, tok, saes, PROMPTS, means, ids, None, batch_size=5)
    keep_all = {k: torch.ones(s.cfg.d_sae, dtype=torch.bool) for k, s in saes.items()}
    torch.testing.assert_close(ablated_metric(model, tok, saes, PROMPTS, means, ids, keep_all, batch_size=5),
                               model_itself, atol=1e-6, rtol=0)
    for k in saes:  # ablating any one submodule's latents moves the metric
        keep = {**keep_all, k: torch.zeros(saes[k].cfg.d_sae, dtype=torch.bool)}
        assert (ablated_metric(model, tok, saes, PROMPTS, means, ids, keep, batch_size=5) - model_itself
                ).abs().max() > 1e-4, k
    scores = _last_site_ig_is_complete(model, tok, saes, ids, means, Site(3))
    assert scores[Site(1, "attn")].shape == (len(PROMPTS), 41) and scores[Site(1, "attn")][:, :-1].abs().sum() > 0


@pytest.mark.parametrize("up, down, cut", [(Site(1), Site(3), (Site(3, "attn"),)),
                                           (Site(1, "attn"), Site(1, "mlp"), ()),
                                           (Site(1, "attn"), Site(1), (Site(1, "mlp"),))])
def test_a_submodule_edge_is_the_derivative_with_the_paths_between_cut(sites, up, down, cut):
    """Σ_u e(u→d) is d's linearised contribution differentiated along the ablation of ``up``, with
    every submodule in ``cut`` held at its clean value (Marks et al.'s stop-gradients)."""
    from refusal_atlas.lm.modeling import hook_site, hooks_removed, last_token_logits

    model, tok, saes, ids, means = sites
    pools = {k: np.arange(s.cfg.d_sae) for k, s in saes.items()}
    edges = edge_scores(model, tok, saes, PROMPTS[:2], means, ids, pools, batch_size=2)
    assert (up, down, cut) in edge_pairs(saes) and set(edges) == {(a, b) for a, b, _ in edge_pairs(saes)}
    edge = edges[(up, down)]
    enc = encode_chat(tok, PROMPTS[:2])
    pos = node_positions(tok, enc)
    clean = record_sites(model, saes, enc)
    f = {k: clean.latents[k].clone().requires_grad_(True) for k in saes}
    e = {k: clean.errors[k].clone().requires_grad_(True) for k in saes}
    g = torch.autograd.grad(refusal_logodds(spliced_logits(model, saes, enc, f, e), ids).sum(), f[down])[0]
    name = {k: s.cfg.metadata.hook_name for k, s in saes.items()}
    held = {k: clean.latents[k] for k in cut}

    def contribution(eps: float) -> torch.Tensor:
        f_u = torch.where(pos[..., None], clean.latents[up] + eps * (means.latents[up] - clean.latents[up]),
                          clean.latents[up])
        e_u = torch.where(pos[..., None], clean.errors[up] + eps * (means.errors[up] - clean.errors[up]),
                          clean.errors[up])
        got = {}
        handles = [hook_site(model, name[up], lambda h: saes[up].decode(f_u) + e_u)]
        handles += [hook_site(model, name[k], lambda h, k=k: saes[k].decode(held[k]) + clean.errors[k]) for k in cut]
        handles.append(hook_site(model, name[down], lambda h: got.setdefault("h", h), replace=False))
        with hooks_removed(handles), torch.no_grad():
            last_token_logits(model, enc)
        return (saes[down].encode(got["h"]) * g * pos[..., None]).sum(1)  # [B, d_sae]: every downstream latent

    h = 1e-4
    fd = (contribution(h) - contribution(-h)) / (2 * h)
    torch.testing.assert_close(edge[:, :-1, :].sum(2).double(), fd, atol=1e-5 + 1e-3 * float(fd.abs().max()), rtol=0)
    assert fd.abs().max() > 1e-3
