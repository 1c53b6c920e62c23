"""The benchmark suite in smoke mode (seconds each), so that it cannot rot. Speed goals are measured
by the scripts themselves (bench/RESULTS.md), never asserted here."""

import re
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name != "common.py")


def test_every_benchmark_is_covered():
    assert set(SCRIPTS) >= {"cache_activations.py", "steer_generate.py", "la_ig.py", "sae_training.py",
                            "planning.py", "dag.py", "gpu.py"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke_mode_prints_its_ratio_last(script, tmp_path):
    extra = ["--workdir", str(tmp_path)] if script == "dag.py" else []
    res = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", *extra], capture_output=True,
                         text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"ratio .+ = (\d+\.\d{3}|nan) \(.+\)", last), last
