"""docs/results.md is generated from a run's files: its numbers are the files' numbers."""

import json

import pandas as pd
from conftest import ROOT

from refusal_atlas.reporting import results_page


def fake_run(tmp_path):
    res = tmp_path / "results"
    (res / "models/m").mkdir(parents=True)
    rate = lambda r, n: {"rate": r, "n": n, "ci_low": r - 0.05, "ci_high": r + 0.05, "confidence": 0.95}  # noqa: E731
    (res / "models/m/model_card.json").write_text(json.dumps({
        "judge": {"name": "substring", "max_new_tokens": 24, "split": "test"}, "meets_targets": True,
        "refusal_rate": {"base": {"bundled harmful": rate(0.02, 84)}, "tuned": {"bundled harmful": rate(0.917, 84)}}}))
    (res / "directions").mkdir()
    (res / "directions/m.json").write_text(json.dumps({"layer": 20}))
    (res / "scores/m").mkdir(parents=True)
    pd.DataFrame([{"promptset": "bundled", "method": "as", "judge": "substring", "metric": "refusal",
                   "split": "test", "label": "harmful", "variant": "plain", "rate": 0.0476, "n": 84,
                   "ci_low": 0.012, "ci_high": 0.095}]).to_csv(res / "scores/m/summary.csv", index=False)
    for rule, secs in (("refusal_tune", [400.0]), ("judge", [2.0, 3.5])):
        for i, s in enumerate(secs):
            (tmp_path / "benchmarks" / rule).mkdir(parents=True, exist_ok=True)
            pd.DataFrame({"s": [s], "max_rss": [1.0]}).to_csv(tmp_path / f"benchmarks/{rule}/{i}.tsv", sep="\t",
                                                               index=False)
    # a one-job rule's benchmark sits flat as benchmarks/<rule>.tsv
    pd.DataFrame({"s": [6.0], "max_rss": [1.0]}).to_csv(tmp_path / "benchmarks/baselines_table.tsv", sep="\t",
                                                        index=False)
    return tmp_path


def test_the_page_carries_the_run_s_numbers_commit_and_machine(tmp_path):
    run = fake_run(tmp_path)
    out = tmp_path / "docs/results.md"
    results_page.main(["--run", str(run), "--out", str(out), "--repo", str(ROOT),
                       "--invocation", "snakemake foundation --cores 2"])
    page = out.read_text()
    assert "0.917" in page and "[0.87, 0.97]" in page and "| bundled harmful | base" in page
    assert "l* = 20" in page and "0.0476" in page and "84" in page
    assert "4 jobs, 6.9 minutes" in page and "| refusal_tune    |      1 |     400" in page
    assert "| baselines_table |      1 |       6   |" in page
    assert "- run: `snakemake foundation --cores 2`" in page
    assert "- commit: `" in page and "unknown" not in page.split("- commit:")[1].splitlines()[0]
    assert "cores" in page.split("- machine:")[1].splitlines()[0]


def test_a_directory_without_results_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="results does not exist"):
        results_page.main(["--run", str(tmp_path), "--out", str(tmp_path / "x.md")])


def test_a_second_run_s_benchmark_table_is_set_beside_row_by_row(tmp_path):
    row = {"model": "m", "promptset": "harmbench", "split": "test", "variant": "plain", "judge": "substring",
           "name": "x", "confidence": 0.95}
    runs = {}
    for name, rates in (("ours", {"base": 0.1, "as": 0.9}), ("reference", {"base": 0.1, "as": 0.6,
                                                                          "la_ig-local-transductive": 0.8})):
        run = fake_run(tmp_path / name)
        (run / "results/tables").mkdir(parents=True)
        pd.DataFrame([{**row, "method": m, "jailbreak_rate": r, "n": 100, "ci_low": r - 0.1, "ci_high": r + 0.1}
                      for m, r in rates.items()]).to_csv(run / "results/tables/benchmark.csv", index=False)
        runs[name] = run
    out = tmp_path / "page.md"
    results_page.main(["--run", str(runs["ours"]), "--out", str(out), "--repo", str(ROOT),
                       "--beside", str(runs["reference"])])
    page = out.read_text()
    assert "## Beside `reference`" in page
    [as_row] = [line for line in page.splitlines() if "| as " in line and "0.900 [0.80, 1.00]" in line]
    assert "0.600 [0.50, 0.70]" in as_row and "-0.3" in as_row
    [local] = [line for line in page.splitlines() if "la_ig-local-transductive" in line]
    assert "0.800 [0.70, 0.90]" in local and "nan" not in local  # only the reference ran it: empty cells
    import pytest

    with pytest.raises(SystemExit, match="benchmark.csv does not exist"):
        results_page.main(["--run", str(fake_run(tmp_path / "bare")), "--out", str(out), "--repo", str(ROOT),
                           "--beside", str(runs["reference"])])
