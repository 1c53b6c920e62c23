"""The ecosystem's conventions, held by tests so they cannot drift: snakefmt-formatted rules, a
README that stays a front door, one test command shared by README, Makefile and CI, the licence
pyproject names, and the workflow catalog's metadata."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from conftest import ROOT


def test_the_workflow_is_snakefmt_formatted():
    snakefmt = Path(sys.executable).with_name("snakefmt")
    res = subprocess.run([str(snakefmt), "--check", "workflow"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    # the sections the front door promises, in order
    heads = [h for h in re.findall(r"^## (.+)$", readme, re.M)]
    order = ["Install and run", "What you get", "Configuration", "On a SLURM cluster", "Layout", "Known gaps"]
    found = [next(i for i, h in enumerate(heads) if h.startswith(o)) for o in order]
    assert found == sorted(found), heads
    # every local link and image resolves
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    assert "ARCHITECTURE.md" not in readme and not re.search(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", readme)


def _test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    return re.search(r"make test\s+#.*?(python -m pytest[^\n`]*)", readme).group(1).strip()


def test_readme_makefile_and_ci_run_one_test_command():
    command = _test_command()
    make = (ROOT / "Makefile").read_text()
    target = re.search(r"^test:.*\n((?:\t.*\n)+)", make, re.M).group(1)
    assert target.strip() == "$(VENV)/bin/" + command
    ci = (ROOT / ".ci/run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    assert ci.index("bash .ci/install.sh") < ci.index("make test")


def test_the_licence_file_is_the_one_pyproject_names():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("Apache License\nVersion 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_workflow_catalog_metadata_is_complete():
    meta = yaml.safe_load((ROOT / ".snakemake-workflow-catalog.yml").read_text())["usage"]
    assert set(meta) == {"mandatory-flags", "software-stack-deployment", "report"}
    assert set(meta["mandatory-flags"]) == {"desc", "flags"}
    assert set(meta["software-stack-deployment"]) <= {"conda", "singularity", "singularity+conda"}
    # the catalog says conda and a report: both must exist
    assert meta["software-stack-deployment"]["conda"] == any((ROOT / "workflow/envs").glob("*.yaml"))
    assert meta["report"] == (ROOT / "workflow/report").is_dir()


def test_there_is_a_changelog_with_an_unreleased_section():
    assert re.search(r"^## Unreleased$", (ROOT / "CHANGELOG.md").read_text(), re.M)
