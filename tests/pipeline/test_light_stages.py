"""The light rules import no model library: their many small jobs (downloads, prompt sets,
gathering, judging, tables, figures) would each pay about 6 s for torch and transformers. Their
stage functions share ``pipeline/<stage>.py`` with heavy ones, which import the model stack inside
the function; this keeps the module tops light. The HarmBench judge rules run in the vLLM
environment (workflow/envs/vllm.yaml), which has no scipy and no SAE library."""

import subprocess
import sys

from conftest import ROOT

from refusal_atlas.pipeline import code_version as cv

HEAVY = ("torch", "transformers", "sae_lens", "transformer_lens", "matplotlib")
SCRIPTS = ROOT / "workflow/scripts"
LIGHT = ("download_dataset", "build_promptsets", "judge", "gather_generations", "summarize_scores",
         "baselines_table", "benchmark_table", "induction_table", "capabilities_table", "features_table",
         "sae_quality_table", "organism_figure", "direction_figure", "sae_quality_figure", "prefetch_hub")


def imported(modules, watch) -> list[str]:
    code = ("import importlib, sys\n"
            f"for m in {sorted(modules)!r}: importlib.import_module('refusal_atlas.' + m)\n"
            f"print(' '.join(m for m in {watch!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return res.stdout.split()


def reached(rule: str) -> set[str]:
    """The pipeline module a rule's script imports, and the library modules its stage function
    imports inside its own body (heavy stages do, light ones must not need to)."""
    out = set()
    for module, function in cv.script_calls(SCRIPTS / f"{rule}.py"):
        nodes, _ = cv.function_dependencies(module, function)
        out |= {module} | {m for node in nodes for m in cv._imported_modules(node, module).values()}
    return out


def test_the_light_rules_are_the_submitting_node_rules():
    # localrules run where the workflow was started, often a login node without the model stack
    snakefile = (ROOT / "workflow/Snakefile").read_text()
    local = snakefile.split("localrules:")[1].split("\n\n")[0]
    named = {x.strip(" ,") for x in local.split() if x.strip(" ,")}
    assert named - {"all", "foundation", "prefetch"} <= set(LIGHT), named - set(LIGHT)


def test_light_rules_reach_no_model_library():
    for rule in LIGHT:
        assert imported(reached(rule), HEAVY) == [], rule


def test_the_harmbench_rules_stay_inside_the_vllm_environment():
    for rule in ("judge_harmbench", "judge_preflight"):
        assert imported(reached(rule), HEAVY + ("scipy", "sklearn")) == [], rule


def test_every_script_calls_its_rule_function_by_keyword_in_the_mirrored_module():
    rules = {}
    for smk in (ROOT / "workflow/rules").glob("*.smk"):
        for line in smk.read_text().splitlines():
            if line.startswith("rule "):
                rules[line[5:].strip(" :")] = smk.stem
    for rule, stage in rules.items():
        text = (SCRIPTS / f"{rule}.py").read_text()
        assert cv.script_calls(SCRIPTS / f"{rule}.py") == [(f"pipeline.{stage}", rule)], rule
        assert f"{stage}.{rule}(\n" in text and "=snakemake." in text, rule
