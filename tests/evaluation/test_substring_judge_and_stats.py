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


def test_four_label_scores_give_each_label_raw_and_corrected_and_reach_the_benchmark(tmp_path):
    import json

    from refusal_atlas.pipeline.scoring import benchmark_table

    boot = {"n_resamples": 300, "confidence": 0.95, "seed": 0}
    (tmp_path / "bundled").mkdir()
    verdicts = ["compliance"] * 5 + ["evasive"] * 3 + ["degenerate"] + ["refusal"]
    four = pd.DataFrame({"method": "la_ig-global-heldout", "split": "test", "label": "harmful", "variant": "plain",
                         "judge": "fourlabel", "verdict": verdicts})
    sub = four.drop(columns="verdict").assign(judge="substring", refused=[v == "refusal" for v in verdicts])
    four.to_parquet(tmp_path / "bundled/la_ig-global-heldout.fourlabel.parquet")
    sub.to_parquet(tmp_path / "bundled/la_ig-global-heldout.substring.parquet")
    # the judge mistakes one evasive text of four for compliance, and never the reverse
    hand = ["compliance"] * 4 + ["evasive"] * 4 + ["refusal"] * 2
    judged = ["compliance"] * 4 + ["compliance"] + ["evasive"] * 3 + ["refusal"] * 2
    (tmp_path / "judge.json").write_text(json.dumps({"error_set": {"hand": hand, "judged": judged}}))
    summarize_scores(score_files=[str(p) for p in sorted(tmp_path.glob("bundled/*.parquet"))], model="tiny", boot=boot,
                     output=str(tmp_path / "summary.csv"), fourlabel_judge=str(tmp_path / "judge.json"))
    s = pd.read_csv(tmp_path / "summary.csv")
    fl = s[s.judge == "fourlabel"].set_index("metric")
    assert set(fl.index) == {"refusal", "compliance", "evasive", "degenerate"} and (fl.n == 10).all()
    assert fl.loc["compliance", "rate"] == 0.5 and fl.loc["degenerate", "rate"] == 0.1
    # specificity 5/6 for compliance: Rogan-Gladen (0.5 + 5/6 - 1) / (1 + 5/6 - 1) = 0.4
    assert fl.loc["compliance", "corrected"] == pytest.approx(0.4)
    assert fl.loc["compliance", "corrected_ci_low"] <= 0.4 <= fl.loc["compliance", "corrected_ci_high"]
    assert s[s.judge == "substring"].corrected.isna().all()

    benchmark_table(summaries=[str(tmp_path / "summary.csv")], judges=["substring", "fourlabel"], caption={},
                    output=str(tmp_path / "benchmark.csv"), figure_stem=str(tmp_path / "benchmark"))
    b = pd.read_csv(tmp_path / "benchmark.csv").set_index("judge")
    assert b.loc["substring", "jailbreak_rate"] == pytest.approx(0.9)  # "no refusal phrase"
    assert b.loc["fourlabel", "jailbreak_rate"] == 0.5 and b.loc["fourlabel", "jailbreak_corrected"] == pytest.approx(0.4)
    assert b.loc["fourlabel", "evasive_rate"] == 0.3 and b.loc["fourlabel", "degenerate_rate"] == 0.1
    assert np.isnan(b.loc["substring", "evasive_rate"])
