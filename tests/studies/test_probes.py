"""Linear probes: C and the dense layer chosen on validation, random sets, metrics with intervals."""

import numpy as np
import pytest

from refusal_atlas.studies.probes import (
    ProbeConfig,
    Split,
    best_dense_layer,
    bootstrap_metrics,
    evaluate_probe,
    fit_probe,
    random_feature_sets,
)

BOOT = {"n_resamples": 300, "confidence": 0.95, "seed": 0}


def layered_data(n: int, signal_layer: int, n_layers: int = 5, d: int = 8, seed: int = 0):
    """Labels readable from one layer only; every other layer is noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    layers = {}
    for l in range(n_layers):
        x = rng.normal(size=(n, d))
        if l == signal_layer:
            x[:, 0] += 3.0 * (2 * y - 1)
        layers[l] = Split(x, y)
    return layers


def test_the_dense_probe_is_tested_on_the_layer_validation_chose():
    train, val, test = (layered_data(200, signal_layer=3, seed=s) for s in (0, 1, 2))
    layer, fitted, scores = best_dense_layer(train, val, ProbeConfig(c_grid=[0.1, 1.0]))
    assert layer == 3 and list(scores.layer) == [0, 1, 2, 3, 4]
    assert scores.set_index("layer").val_accuracy.idxmax() == 3
    rows = evaluate_probe("dense", fitted, {"vanilla": test[layer]}, BOOT, layer=layer)
    acc = next(r for r in rows if r["metric"] == "accuracy")
    assert acc["value"] > 0.9 and acc["layer"] == 3
    # the same probe read on another layer is at chance: testing on the wrong layer (the
    # reference's bug) would show here
    wrong = evaluate_probe("dense", fitted, {"vanilla": test[1]}, BOOT)
    assert next(r for r in wrong if r["metric"] == "accuracy")["value"] < 0.7


def test_c_is_chosen_on_validation():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    x = rng.normal(size=(60, 40))
    x[:, 0] += 1.5 * (2 * y - 1)
    yv = rng.integers(0, 2, 300)
    xv = rng.normal(size=(300, 40))
    xv[:, 0] += 1.5 * (2 * yv - 1)
    grid = [0.001, 0.01, 0.1, 100.0]
    fitted = fit_probe(Split(x, y), Split(xv, yv), ProbeConfig(c_grid=grid))
    by_c = {c: fit_probe(Split(x, y), Split(xv, yv), ProbeConfig(c_grid=[c])).val_accuracy for c in grid}
    assert len(set(by_c.values())) > 1  # the grid matters here
    assert fitted.val_accuracy == max(by_c.values()) and by_c[fitted.c] == fitted.val_accuracy
    with pytest.raises(ValueError, match="both classes"):
        fit_probe(Split(x, np.zeros(60)), Split(xv, yv), ProbeConfig())


def test_random_sets_match_sizes_draw_live_latents_and_avoid_the_refusal_set():
    live = {4: np.zeros(50, bool), 9: np.ones(30, bool)}
    live[4][10:30] = True
    sets = random_feature_sets({4: 3, 9: 5}, live, n_sets=10, seed=0, exclude={4: [10, 11], 9: [0]})
    assert len(sets) == 10
    for s in sets:
        assert len(s[4]) == 3 and len(s[9]) == 5
        assert live[4][s[4]].all() and not {10, 11} & set(s[4]) and 0 not in s[9]
    assert len({tuple(s[9]) for s in sets}) > 1  # draws differ
    again = random_feature_sets({4: 3, 9: 5}, live, n_sets=10, seed=0, exclude={4: [10, 11], 9: [0]})
    assert all((a[9] == b[9]).all() for a, b in zip(sets, again))  # seeded
    with pytest.raises(ValueError, match="live latents"):
        random_feature_sets({4: 30}, live, n_sets=1, seed=0)


def test_metrics_carry_n_and_intervals_and_no_auroc_for_one_class():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0] * 10)
    score = np.where(y == 1, 0.8, 0.2)
    score[:4] = 1 - score[:4]  # 4 of 80 wrong
    m = bootstrap_metrics(y, score, **BOOT)
    assert m["accuracy"]["value"] == pytest.approx(76 / 80) and m["accuracy"]["n"] == 80
    assert m["accuracy"]["ci_low"] < m["accuracy"]["value"] <= m["accuracy"]["ci_high"]
    assert 0.9 < m["auroc"]["value"] < 1
    one = bootstrap_metrics(np.ones(10, int), np.full(10, 0.7), **BOOT)
    assert one["accuracy"]["value"] == 1 and np.isnan(one["auroc"]["value"]) and np.isnan(one["auroc"]["ci_low"])
