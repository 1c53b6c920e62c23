"""The modularity test on synthetic circuits: it must tell shared from disjoint mechanisms, and
its p-values must be valid (uniform under exchangeable labels), unlike the reference's."""

import numpy as np
import pandas as pd
import pytest

from refusal_atlas.studies.modularity import (
    Circuit,
    PermutationConfig,
    Scores,
    discover,
    importance_correlation,
    jaccard,
    mean_off_diagonal,
    pairwise_tests,
    permutation_test,
    similarity,
    verdict,
    weighted_jaccard,
)

POOL = 40
LAYERS = [0, 1]


def synthetic(kind: str, n_groups: int = 4, per_group: int = 16, seed: int = 0, noise: float = 0.6):
    """Per-prompt node IEs: every group shares one mechanism (``shared``), has its own
    (``disjoint``), or has a shared core plus its own features (``mixed``)."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"c{i}" for i in range(n_groups)], per_group)
    nodes, edges = {}, {}
    for l in LAYERS:
        means = np.zeros((n_groups, POOL + 1))
        for g in range(n_groups):
            if kind in ("shared", "mixed"):
                means[g, 0:6] = -3.0
            if kind in ("disjoint", "mixed"):
                start = 6 + 8 * g
                means[g, start:start + (6 if kind == "disjoint" else 3)] = -3.0
        rows = means[np.repeat(np.arange(n_groups), per_group)]
        nodes[l] = rows + rng.normal(0, noise, rows.shape)
        nodes[l][:, -1] = rng.normal(-0.5, 0.1, len(rows))
    ids = {l: np.append(np.arange(POOL), -1) for l in LAYERS}
    # edges follow the nodes: strong between the two layers' strong latents
    e = np.einsum("nd,nu->ndu", np.abs(nodes[1]), np.abs(nodes[0])) / 10
    edges[(0, 1)] = e
    return Scores(LAYERS, ids, nodes, ids, edges), groups


CFG = PermutationConfig(n_nodes=6, n_edges=12, n_permutations=99, n_bootstrap=50, seed=0)


def test_categories_sharing_one_mechanism_are_not_called_modular():
    scores, groups = synthetic("shared")
    tests = permutation_test(scores, groups, CFG)
    row = tests.set_index("similarity").loc["jaccard"]
    assert row.p_value > 0.05 and row.observed > 0.8
    assert row.ci_low <= row.observed <= row.ci_high
    v = verdict(tests, pairwise_tests(scores, groups, CFG), alpha=0.05)
    assert v["verdict"] == "monolithic"


def test_categories_with_disjoint_features_are_called_modular():
    scores, groups = synthetic("disjoint")
    tests = permutation_test(scores, groups, CFG)
    t = tests.set_index("similarity")
    assert t.loc["jaccard", "p_value"] == pytest.approx(1 / 100)  # below every relabelling
    assert t.loc["weighted_jaccard", "p_value"] <= 0.02
    # few edges floor every edge Jaccard near 0, relabelled or not: it can only not exceed its null
    assert t.loc["edge_jaccard", "effect"] <= 0
    assert t.loc["jaccard", "observed"] < 0.2 and t.loc["jaccard", "effect"] < 0
    pairs = pairwise_tests(scores, groups, CFG)
    assert len(pairs) == 6 and pairs.significant.all()
    assert (pairs.p_adjusted >= pairs.p_value - 1e-12).all()
    assert verdict(tests, pairs)["verdict"] == "modular"


def test_a_shared_core_with_specific_features_is_mixed():
    """6 shared latents and 3 of each category's own: the weights tell the core from the rest."""
    cfg = PermutationConfig(n_nodes=9, n_edges=12, n_permutations=99, n_bootstrap=20, seed=0)
    scores, groups = synthetic("mixed")
    tests = permutation_test(scores, groups, cfg)
    v = verdict(tests, pairwise_tests(scores, groups, cfg, kind="weighted_jaccard"), primary="weighted_jaccard")
    assert v["p_value"] < 0.05 and v["ratio"] >= 0.5 and v["verdict"] == "mixed"


def test_p_values_are_uniform_under_exchangeable_labels():
    """The reference compared with one random circuit; a valid test rejects 10% of null data at 0.1."""
    cfg = PermutationConfig(n_nodes=6, n_edges=0, n_permutations=39, n_bootstrap=0, seed=1)
    ps = []
    for seed in range(60):
        scores, groups = synthetic("shared", n_groups=3, per_group=8, seed=100 + seed, noise=2.0)
        scores.edges.clear()
        row = permutation_test(scores, groups, cfg, kinds=["weighted_jaccard"]).iloc[0]
        ps.append(row.p_value)
    ps = np.array(ps)
    assert 0.0 <= (ps <= 0.1).mean() <= 0.25  # 10% expected; 6 of 60, binomial sd ~ 2.3
    assert (ps <= 0.5).mean() == pytest.approx(0.5, abs=0.2)


def test_similarities_on_known_circuits():
    a = Circuit({(0, 1): -2.0, (0, 2): -1.0, (1, 5): 1.0, (0, -1): 9.0}, {(0, 1, 1, 5): 0.5})
    b = Circuit({(0, 1): -4.0, (0, 3): -1.0, (1, 5): 3.0, (1, -1): 1.0}, {(0, 1, 1, 5): 0.1, (0, 3, 1, 5): 0.2})
    assert similarity(a, b, "jaccard") == pytest.approx(2 / 4)  # error nodes are not compared
    assert similarity(a, b, "edge_jaccard") == pytest.approx(1 / 2)
    wa = {(0, 1): 0.5, (0, 2): 0.25, (1, 5): 0.25}
    wb = {(0, 1): 0.5, (0, 3): 0.125, (1, 5): 0.375}
    expect = sum(min(wa.get(k, 0), wb.get(k, 0)) for k in set(wa) | set(wb)) / sum(
        max(wa.get(k, 0), wb.get(k, 0)) for k in set(wa) | set(wb))
    assert similarity(a, b, "weighted_jaccard") == pytest.approx(expect)
    assert np.isnan(importance_correlation({1: 1.0, 2: 2.0}, {1: 1.0, 2: 3.0}))  # fewer than 3 shared
    assert importance_correlation({1: 1.0, 2: 2.0, 3: 3.0}, {1: 2.0, 2: 4.0, 3: 6.0}) == pytest.approx(1.0)
    assert jaccard(set(), set()) != jaccard(set(), set())  # undefined, not 0 or 1
    assert weighted_jaccard({1: 0.0}, {1: 1.0}) != weighted_jaccard({1: 0.0}, {1: 1.0})
    assert mean_off_diagonal(pd.DataFrame([[1, 0.2], [0.4, 1]])) == pytest.approx(0.3)


def test_discovery_keeps_the_strongest_nodes_per_layer_and_edges_among_them():
    scores, groups = synthetic("disjoint", noise=0.0)
    c = discover(scores, np.flatnonzero(groups == "c1"), n_nodes=6, n_edges=5)
    assert {k for k in c.nodes if k[0] == 0 and k[1] >= 0} == {(0, i) for i in range(14, 20)}
    assert (0, -1) in c.nodes and (1, -1) in c.nodes
    assert len(c.edges) == 5 and all((a, u) in c.nodes and (b, d) in c.nodes for a, u, b, d in c.edges)


def test_stratified_relabelling_keeps_sizes_and_mixes_every_group():
    from refusal_atlas.studies.modularity import stratified_relabel

    groups = np.array(["a"] * 10 + ["b"] * 6)
    out = stratified_relabel(groups, np.random.default_rng(0))
    assert (out == "a").sum() == 10 and (out == "b").sum() == 6
    # each new group holds old a and old b prompts alike (10:6 in proportion, give or take one)
    assert 5 <= ((groups == "a") & (out == "a")).sum() <= 7


def test_a_threshold_keeps_every_node_above_it():
    scores, groups = synthetic("disjoint", noise=0.0)
    rows = np.flatnonzero(groups == "c0")
    c = discover(scores, rows, n_nodes=1, n_edges=0, threshold=2.5)
    assert {k for k in c.nodes if k[0] == 0 and k[1] >= 0} == {(0, i) for i in range(6, 12)}
    assert not discover(scores, rows, n_nodes=1, n_edges=0, threshold=99.0).edges
