"""Faults a user meets, injected into a small DAG on the tiny model: a job killed with SIGKILL while
it writes, a dataset changed after its download, an edited library function and an edited
statistics key. Each case checks which jobs rerun, and that the final outputs equal a clean run's
up to timing fields.

The DAG runs from a copy of the repository (its own ``src`` on PYTHONPATH), so that the test can
edit the library without touching the checkout other tests import.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

pytestmark = pytest.mark.workflow

# the organism's directory is a target of `all` too: a missing intermediate reruns nothing by itself
TARGETS = ["results/models/tiny/tuned", "results/models/tiny/model_card.json", "results/scores/tiny/summary.csv"]
TIMING_KEYS = ("seconds", "seconds_per_prompt", "time", "elapsed")


def _copy_repo(dst: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".snakemake", "results", "logs", "benchmarks")
    for name in ("workflow", "src", "resources", "config"):
        shutil.copytree(ROOT / name, dst / name, symlinks=True, ignore=ignore)
    return dst


def _config(work: Path, model_dir: Path, mirror: str) -> Path:
    cfg = yaml.safe_load((ROOT / ".test/config/config.yaml").read_text())
    cfg["models"]["tiny"]["path"] = str(model_dir)
    cfg["datasets"]["mirror"] = mirror
    cfg["activations"]["promptsets"] = ["bundled"]
    cfg["evaluation"].update(methods=["base"], promptsets=["bundled"])
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Dag:
    def __init__(self, repo: Path, work: Path, config: Path):
        self.repo, self.work, self.config = repo, work, config
        self.env = {**os.environ, "PYTHONPATH": str(repo / "src")}

    def command(self, *extra: str, config: Path | None = None) -> list[str]:
        return [sys.executable, "-m", "snakemake", "-s", str(self.repo / "workflow/Snakefile"), "--directory",
                str(self.work), "--configfile", str(config or self.config), "--cores", "2", *extra]

    def __call__(self, *extra: str, ok: bool = True, config: Path | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run(self.command(*extra, config=config), capture_output=True, text=True, env=self.env)
        if ok:
            assert res.returncode == 0, res.stderr[-4000:]
        return res

    def planned(self, *targets: str, config: Path | None = None) -> dict[str, int]:
        """Jobs a dry run plans, by rule."""
        res = self("-n", *TARGETS, *targets, "--quiet", "rules", config=config)
        counts, table = {}, False
        for line in (res.stdout + res.stderr).splitlines():
            parts = line.split()
            if parts[:2] == ["job", "count"]:
                table = True
            elif table and len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
                counts[parts[0]] = int(parts[1])
        return counts

    def outputs(self) -> dict[str, str]:
        """A digest of every result file; JSON timing fields left out."""
        out = {}
        for path in sorted((self.work / "results").rglob("*")):
            if not path.is_file():
                continue
            rel = str(path.relative_to(self.work))
            if path.suffix == ".json":
                out[rel] = json.dumps(_untimed(json.loads(path.read_text())), sort_keys=True)
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        return out


def _kill_all(work: Path) -> None:
    """SIGKILL snakemake and every job it started in ``work`` (a job's script lies under
    ``work/.snakemake/scripts``, and the local executor may start jobs in their own session)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(work) in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _untimed(x):
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k not in TIMING_KEYS}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


@pytest.fixture(scope="module")
def dag(tmp_path_factory, tiny_model_dir, mirror_url):
    repo = _copy_repo(tmp_path_factory.mktemp("repo"))
    work = tmp_path_factory.mktemp("faults")
    d = Dag(repo, work, _config(work, tiny_model_dir, mirror_url))
    d(*TARGETS)
    d.clean = d.outputs()
    assert "results/models/tiny/tuned/model.safetensors" in d.clean
    return d


def test_a_job_killed_mid_write_leaves_nothing_trusted_and_the_rerun_equals_a_clean_run(dag):
    parent = dag.work / "results/models/tiny"
    proc = subprocess.Popen(dag.command("--forcerun", "refusal_tune", *TARGETS), env=dag.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    caught, deadline = None, time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        caught = next(parent.glob(".tuned.*.tmp"), None)
        if caught is not None:  # the organism's weights are being written: kill the job and snakemake
            _kill_all(dag.work)
            break
        time.sleep(0.002)
    proc.wait()
    assert caught is not None, "refusal_tune finished before its write could be caught"
    assert not (parent / "tuned").exists()  # the half-written directory never takes the final name
    dag("--unlock")  # what a user runs after a killed snakemake
    assert dag.planned().get("refusal_tune") == 1
    dag(*TARGETS)
    assert not list(parent.glob(".tuned.*.tmp"))  # the next write cleared the killed one's
    assert dag.outputs() == dag.clean


def test_a_dataset_changed_after_download_fails_its_reader_and_a_fresh_copy_restores_the_run(dag):
    dataset = dag.work / "resources/datasets/refusal_direction/splits/harmful_test.json"
    original = dataset.read_bytes()
    dataset.write_bytes(original.replace(b"]", b" ]", 1) if original.rstrip().endswith(b"]") else original + b" ")
    res = dag("--forcerun", "build_promptsets", *TARGETS, ok=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "does not match the manifest" in out and "harmful_test.json" in out
    assert not (dag.work / "results/promptsets/refusal_direction.parquet").exists()
    dataset.unlink()  # what the error tells the user to do; then the failed job's output is asked for
    promptset = "results/promptsets/refusal_direction.parquet"
    planned = dag.planned(promptset)
    # the fresh copy is fetched and verified, and what reads it rebuilt; the model is not refetched
    assert planned["download_dataset"] == 1 and planned["build_promptsets"] == 1 and "prepare_model" not in planned
    dag(*TARGETS, promptset)
    assert dataset.read_bytes() == original and dag.outputs() == dag.clean


def test_a_statistics_key_reruns_the_statistics_never_the_training(dag):
    cfg = yaml.safe_load(dag.config.read_text())
    cfg["bootstrap"]["n_resamples"] = 150
    changed = dag.work / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    planned = dag.planned(config=changed)
    assert set(planned) == {"base_refusal", "organism_card", "summarize_scores"}, planned


def test_a_library_edit_reruns_only_the_rules_that_run_it_with_identical_results(dag):
    judges = dag.repo / "src/refusal_atlas/evaluation/substring_judge.py"
    text = judges.read_text()
    assert dag.planned() == {}
    # a comment is not code
    judges.write_text(text.replace("def substring_refusals(", "# a note\ndef substring_refusals(", 1))
    assert dag.planned() == {}
    # the same judgement, written another way
    judges.write_text(text.replace("    needles = [_normalise(s) for s in substrings]",
                                   "    needles = list(map(_normalise, substrings))", 1))
    planned = dag.planned()
    assert {"judge", "base_refusal", "organism_card"} <= set(planned)
    assert not set(planned) & {"refusal_tune", "prepare_model", "build_promptsets", "download_dataset",
                               "steer_generate", "gather_generations"}
    dag(*TARGETS)
    assert dag.outputs() == dag.clean
    judges.write_text(text)
