"""Rules rerun when the library code they run changes, and only then (refusal_atlas.pipeline.code_version)."""

import shutil
from pathlib import Path

import pytest
from conftest import ROOT

from refusal_atlas.pipeline import code_version as cv

SCRIPTS = ROOT / "workflow/scripts"


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A copy of the package whose modules a test may edit; hashes are computed on the copy."""
    copy = tmp_path / "refusal_atlas"
    shutil.copytree(ROOT / "src/refusal_atlas", copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cv, "SOURCE", copy)
    for f in (cv._tree, cv._module_digest, cv._module_imports, cv._module_definitions, cv.module_closure):
        f.cache_clear()
    yield copy
    for f in (cv._tree, cv._module_digest, cv._module_imports, cv._module_definitions, cv.module_closure):
        f.cache_clear()


def versions() -> dict[str, str]:
    for f in (cv._tree, cv._module_digest, cv._module_imports, cv._module_definitions, cv.module_closure):
        f.cache_clear()
    return {p.stem: cv.code_version(p) for p in sorted(SCRIPTS.glob("*.py"))}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def test_every_script_calls_a_library_function_and_hashes_differ_by_stage():
    v = versions()
    assert len(v) >= 40
    # stages in one module still get their own hash: only what each reaches counts
    assert len(set(v.values())) == len(v)


def test_a_body_edit_in_judges_reruns_exactly_the_stages_that_reach_it(package):
    before = versions()
    edit(package / "evaluation/substring_judge.py", "    needles = [_normalise(s) for s in substrings]",
         "    needles = [_normalise(s).strip() for s in substrings]")
    after = versions()
    changed = {s for s in before if before[s] != after[s]}
    reach = {s for s in before if "evaluation.substring_judge" in {m for mod, fn in cv.script_calls(SCRIPTS / f"{s}.py")
                                              for m in cv.function_dependencies(mod, fn)[1] | {mod}}}
    assert changed == reach
    assert {"judge", "base_refusal", "organism_card", "steering_search", "refusal_direction"} <= changed
    assert not changed & {"refusal_tune", "prepare_model", "train_sae", "build_promptsets", "select_features"}


def test_comments_blank_lines_and_docstrings_rerun_nothing(package):
    before = versions()
    text = (package / "core/stats.py").read_text()
    (package / "core/stats.py").write_text("# a new comment\n\n" + text.replace("\n\n", "\n\n\n", 1) + "\n# and one more\n")
    edit(package / "evaluation/substring_judge.py", '"""', '"""A docstring edit. ')
    assert versions() == before


def test_an_edit_to_one_stage_function_reruns_that_stage_only(package):
    before = versions()
    edit(package / "pipeline/features.py", "def select_features(*, method: str, attributions: Mapping[str, str], "
         "cfg: Mapping, output: str) -> None:\n", "def select_features(*, method: str, attributions: Mapping[str, str], "
         "cfg: Mapping, output: str) -> None:\n    method = str(method)\n")
    after = versions()
    assert {s for s in before if before[s] != after[s]} == {"select_features"}


def test_a_stage_helper_edit_reruns_the_stages_that_call_it(package):
    before = versions()
    edit(package / "features/direction.py", "def fit_direction(", "def fit_direction(*_a, **_k):\n    pass\n\n\ndef _old_fit(")
    after = versions()
    changed = {s for s in before if before[s] != after[s]}
    assert {"refusal_direction", "feature_attribution"} <= changed
    assert not changed & {"select_features", "refusal_tune", "judge", "train_sae"}


def test_stage_reads_sees_keys_read_in_the_stage_and_the_dataclasses_it_builds():
    reads = cv.stage_reads(SCRIPTS / "refusal_tune.py")
    assert {"train_promptsets", "max_harmful", "epochs", "lr", "attn_implementation"} <= reads
    assert "eval_max_new_tokens" not in reads and "k_star" not in cv.stage_reads(SCRIPTS / "feature_attribution.py")
