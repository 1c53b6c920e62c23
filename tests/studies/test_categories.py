"""Common vs specific refusal features of harm categories (Yeo et al. 2025 §4.2)."""

import numpy as np
import pandas as pd
import pytest
import torch

from refusal_atlas.studies.categories import (
    category_directions,
    common_features,
    condition_sets,
    normalized_jailbreak,
    specific_features,
    summarize_conditions,
)


def sets():
    rows = []
    own = {"a": [(1, 10), (1, 11), (2, 12)], "b": [(1, 20), (2, 21), (2, 22)], "c": [(1, 30), (2, 31)]}
    for cat, feats in own.items():
        for rank, (l, f) in enumerate([(1, 1), (2, 2)] + feats, start=1):
            rows.append({"category": cat, "rank": rank, "layer": l, "feature": f, "score": 10.0 - rank})
    rows.append({"category": "a", "rank": 9, "layer": 2, "feature": 21, "score": 0.5})  # shared by a and b only
    return pd.DataFrame(rows)


def test_common_is_the_intersection_and_specific_is_truncated_to_its_size():
    s = sets()
    common = common_features(s)
    assert set(zip(common.layer, common.feature)) == {(1, 1), (2, 2)}
    assert len(common_features(s, min_fraction=0.6)) == 3  # (2, 21) is in 2 of 3 sets
    spec = specific_features(s, common, "a", size=len(common))
    assert list(zip(spec.layer, spec.feature)) == [(1, 10), (1, 11)]  # top by score, common removed
    common, conds = condition_sets(s)
    assert len(conds[("b", "all", "b")]) == 5 and len(conds[("b", "specific", "b")]) == 2
    # transfer: every other category's specific set on this category's prompts
    assert {k[2] for k in conds if k[0] == "c" and k[1] == "transfer"} == {"a", "b"}
    assert conds[("c", "transfer", "a")].equals(conds[("a", "specific", "a")])


def test_no_common_feature_leaves_specific_sets_whole():
    s = sets()
    s = s[~s.feature.isin([1, 2])]
    common, conds = condition_sets(s)
    assert common.empty and len(conds[("a", "specific", "a")]) == len(s[s.category == "a"])


def test_normalized_jailbreak_divides_by_all_and_averages_transfer():
    rates = pd.DataFrame([
        {"category": "a", "condition": "all", "source": "a", "jailbreak_rate": 0.8, "n": 10, "ci_low": 0.6, "ci_high": 1.0, "n_features": 5},
        {"category": "a", "condition": "specific", "source": "a", "jailbreak_rate": 0.4, "n": 10, "ci_low": 0.2, "ci_high": 0.6, "n_features": 2},
        {"category": "a", "condition": "transfer", "source": "b", "jailbreak_rate": 0.2, "n": 10, "ci_low": 0.0, "ci_high": 0.4, "n_features": 2},
        {"category": "a", "condition": "transfer", "source": "c", "jailbreak_rate": 0.0, "n": 10, "ci_low": 0.0, "ci_high": 0.0, "n_features": 2},
        {"category": "b", "condition": "all", "source": "b", "jailbreak_rate": 0.0, "n": 10, "ci_low": 0.0, "ci_high": 0.0, "n_features": 5},
        {"category": "b", "condition": "specific", "source": "b", "jailbreak_rate": 0.1, "n": 10, "ci_low": 0.0, "ci_high": 0.3, "n_features": 2},
    ])
    norm = normalized_jailbreak(rates).set_index(["category", "condition"])
    assert norm.loc[("a", "specific"), "normalized"] == pytest.approx(0.5)
    assert norm.loc[("a", "transfer"), "normalized"] == pytest.approx(0.125) and norm.loc[("a", "transfer"), "n_sources"] == 2
    assert np.isnan(norm.loc[("b", "specific"), "normalized"])  # nothing to normalise by
    summary = summarize_conditions(norm.reset_index()).set_index("condition")
    assert summary.loc["specific", "n_categories"] == 1 and summary.loc["all", "mean_normalized"] == 1.0


def test_category_directions_use_the_categorys_prompts_only():
    index = pd.DataFrame({
        "row": range(6), "split": "train", "label": ["harmful", "harmful", "harmful", "harmless", "harmless", "harmful"],
        "variant": ["plain", "plain", "plain", "twin", "plain", "jailbreak"], "category": ["x", "x", "y", "x", "none", "x"]})
    acts = torch.zeros(6, 1, 2)
    acts[0, 0] = torch.tensor([2.0, 0.0])
    acts[1, 0] = torch.tensor([4.0, 0.0])
    acts[2, 0] = torch.tensor([0.0, 8.0])
    acts[5, 0] = torch.tensor([100.0, 100.0])  # a jailbreak never enters r
    r = category_directions(acts, index, ["x"], "train", min_prompts=2)
    torch.testing.assert_close(r["x"][0], torch.tensor([3.0, 0.0]))
    with pytest.raises(ValueError, match="category 'y'"):
        category_directions(acts, index, ["y"], "train", min_prompts=2)


def test_bait_directions_contrast_a_category_with_its_own_safe_prompts():
    """OR-Bench: r_cat = mean(toxic of c) - mean(seemingly toxic safe prompts of c), no other category's."""
    index = pd.DataFrame({
        "row": range(6), "split": "train", "label": ["harmful", "harmful", "harmless", "harmless", "harmless", "harmless"],
        "variant": ["plain", "plain", "bait", "bait", "bait", "twin"], "category": ["x", "x", "x", "x", "y", "x"]})
    acts = torch.zeros(6, 1, 2)
    acts[0, 0], acts[1, 0] = torch.tensor([4.0, 0.0]), torch.tensor([6.0, 0.0])
    acts[2, 0], acts[3, 0] = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 3.0])
    acts[4, 0] = acts[5, 0] = torch.tensor([50.0, 50.0])  # another category's bait, and a twin: never used
    r = category_directions(acts, index, ["x"], "train", harmless="bait", min_prompts=2)
    torch.testing.assert_close(r["x"][0], torch.tensor([4.0, -2.0]))


def test_circuit_groups_take_the_configured_safe_variant_or_none():
    from refusal_atlas.pipeline.categories import _circuit_groups

    df = pd.DataFrame({
        "id": [f"p{i}" for i in range(6)], "split": "train",
        "label": ["harmful", "harmful", "harmless", "harmless", "harmless", "harmless"],
        "variant": ["plain", "plain", "twin", "twin", "bait", "bait"], "category": ["x", "y", "x", "y", "x", "y"]})
    bait = _circuit_groups(df, ["x", "y"], "train", None, 0, "bait")
    assert set(bait[bait.group == "safe"].id) == {"p4", "p5"} and set(bait[bait.group == "toxic"].id) == {"p0", "p1"}
    assert set(_circuit_groups(df, ["x", "y"], "train", None, 0)[lambda d: d.group == "safe"].id) == {"p2", "p3"}
    toxic_only = _circuit_groups(df[df.label == "harmful"], ["x", "y"], "train", None, 0)  # CatQA: no safe prompts
    assert set(toxic_only.group) == {"toxic"}
