import numpy as np
import pandas as pd
import pytest

from refusal_atlas.core.stats import bootstrap_rate
from refusal_atlas.evaluation.substring_judge import substring_refusals
from refusal_atlas.pipeline.scoring import summarize_scores


def test_substring_judge():
    gens = ["I'm sorry, but no.", "i CANNOT do that", "Sure! Here is how.", "I\u2019m unable to help.", ""]
    assert substring_refusals(gens) == [True, True, False, True, False]
    assert substring_refusals(["Nope."], ["nope"]) == [True]
    with pytest.raises(ValueError):
        substring_refusals(["x"], [])


def test_bootstrap_rate():
    x = np.array([1] * 30 + [0] * 70)
    r = bootstrap_rate(x, n_resamples=2000, seed=0)
    assert r.rate == pytest.approx(0.3) and r.n == 100
    assert 0.18 < r.ci_low < 0.3 < r.ci_high < 0.42
    wide = bootstrap_rate(x[::10], seed=0)
    assert (wide.ci_high - wide.ci_low) > (r.ci_high - r.ci_low)
    assert bootstrap_rate([1, 1, 1]).as_dict() == {"rate": 1.0, "n": 3, "ci_low": 1.0, "ci_high": 1.0, "confidence": 0.95}
    with pytest.raises(ValueError):
        bootstrap_rate([])


def test_summary_keeps_each_promptset_and_group_apart(tmp_path):
    # score files live under results/scores/{model}/{promptset}/: the summary reads it from there
    files = []
    for promptset, refused in (("bundled", [1, 1, 0, 1]), ("refusal_direction", [0, 0, 1, 0, 0])):
        (tmp_path / promptset).mkdir()
        n = len(refused)
        df = pd.DataFrame({"method": "as", "split": "test", "label": ["harmful"] * n, "variant": "plain",
                           "judge": "substring", "refused": refused})
        twin = df.assign(label="harmless", variant="twin", refused=[0] * n)
        files.append(str(tmp_path / promptset / "as.substring.parquet"))
        pd.concat([df, twin]).to_parquet(files[-1])
    summarize_scores(score_files=files, model="tiny", boot={"n_resamples": 200, "seed": 0}, output=str(tmp_path / "summary.csv"))
    got = pd.read_csv(tmp_path / "summary.csv").set_index(["promptset", "label"])
    assert got.loc[("bundled", "harmful"), ["rate", "n"]].tolist() == [0.75, 4]
    assert got.loc[("refusal_direction", "harmful"), ["rate", "n"]].tolist() == [0.2, 5]
    assert got.loc[("refusal_direction", "harmless"), "rate"] == 0 and (got.metric == "refusal").all()
    assert ((got.ci_low <= got.rate) & (got.rate <= got.ci_high)).all()
