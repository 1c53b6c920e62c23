"""The cluster profiles and the paper configs, planned offline (dry runs, no network).

Each dry run starts in an empty directory, so it plans the whole DAG: job counts per rule follow
from the config, and every job's resources are what the executor would submit.
"""

import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import yaml
from conftest import ROOT

GPU_RULES = {"base_refusal", "refusal_tune", "organism_card", "cache_activations",
             "refusal_direction", "sae_corpus", "train_sae",
             "sae_quality", "feature_attribution", "steering_search", "steer_generate", "capabilities",
             "judge_preflight", "judge_harmbench", "adversarial_responses", "jailbreak_mechanism", "guardrail_select",
             "guardrail_eval", "refusal_guardrail", "feature_dashboards", "category_features",
             "category_steering", "circuits"}
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def planned_blocks(workdir, *args):
    """(rule, job block) of every planned job, from `snakemake -n` in an empty directory."""
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(ROOT / "workflow/Snakefile"), "--directory", str(workdir),
         *args],
        capture_output=True, text=True, cwd=ROOT, env=OFFLINE, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    blocks = []
    for block in re.split(r"\n\s*\n", res.stdout):
        head = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if head:
            blocks.append((head.group(1), block))
    return blocks


def plan(workdir, *args):
    """(rule, resources, threads) of every planned job."""
    jobs = []
    for rule, block in planned_blocks(workdir, *args):
        found = re.search(r"^\s+resources: (.*)$", block, re.M)
        if found:
            resources = dict(kv.split("=", 1) for kv in found.group(1).split(", "))
            threads = re.search(r"^\s+threads: (\d+)$", block, re.M)
            jobs.append((rule, resources, int(threads.group(1)) if threads else 1))
    return jobs


def paper_plan(tmp_path, name):
    return plan(tmp_path, "--profile", "profiles/slurm", "--configfile", str(ROOT / f"config/{name}.yaml"),
                "--replace-workflow-config")


def gpus_by_rule(jobs):
    out = {}
    for rule, res, _ in jobs:
        out.setdefault(rule, set()).add(int(res.get("gpu", 0)))
    return out


def test_gemma_paper_config_plans_gemma_scope_on_26_layers_one_gpu_each(tmp_path):
    jobs = paper_plan(tmp_path, "gemma-2-2b-it")
    counts = Counter(rule for rule, _, _ in jobs)
    assert counts["pretrained_sae"] == 26 and counts["sae_quality"] == 26
    # 7 conditions x HarmBench, JailbreakBench, AdvBench; every generation judged by both judges
    assert counts["steer_generate"] == 21 and counts["judge_harmbench"] == 21 and counts["judge"] == 21
    assert counts["feature_attribution"] == 2 and counts["judge_preflight"] == 1
    # a chat model is studied as it is: no organism, no SAE training, c and K* fixed (no search)
    assert not {"refusal_tune", "train_sae", "steering_search"} & set(counts)
    by_rule = gpus_by_rule(jobs)
    for rule, gpus in by_rule.items():
        assert gpus == ({1} if rule in GPU_RULES else {0}), (rule, gpus)
    cfg = yaml.safe_load((ROOT / "config/gemma-2-2b-it.yaml").read_text())
    spec = cfg["models"]["gemma-2-2b-it"]
    assert spec["overrides"] == {"direction": {"layer": 15}, "steering": {"c": -3}}
    assert spec["sae"]["sae_id"].format(layer=15) == "layer_15/width_65k/canonical"
    assert cfg["features"]["k0"] == 10 and cfg["features"]["k_star"] == 20 and cfg["steering"]["k_star"] == 20
    assert cfg["evaluation"]["judges"] == ["substring", "harmbench"]


def test_llama_paper_config_asks_two_gpus_for_la_ig_through_32_saes(tmp_path):
    jobs = paper_plan(tmp_path, "llama-3.1-8b-instruct")
    counts = Counter(rule for rule, _, _ in jobs)
    assert counts["pretrained_sae"] == 32 and counts["sae_quality"] == 32 and counts["steer_generate"] == 21
    by_rule = gpus_by_rule(jobs)
    # LA-IG through 32 SAEs, for all harmful prompts and per harm category
    assert by_rule["feature_attribution"] == {2} and by_rule["category_features"] == {2}
    for rule, gpus in by_rule.items():
        if rule not in ("feature_attribution", "category_features"):
            assert gpus == ({1} if rule in GPU_RULES else {0}), (rule, gpus)
    spec = yaml.safe_load((ROOT / "config/llama-3.1-8b-instruct.yaml").read_text())["models"]["llama-3.1-8b-instruct"]
    assert spec["overrides"]["direction"] == {"layer": 11} and spec["overrides"]["steering"] == {"c": -1}
    assert spec["sae"]["release"] == "llama_scope_lxr_8x" and spec["sae"]["sae_id"].format(layer=11) == "l11r_8x"


def test_one_config_sweeps_both_models_with_their_own_settings(tmp_path):
    jobs = paper_plan(tmp_path, "paper")
    counts = Counter(rule for rule, _, _ in jobs)
    assert counts["pretrained_sae"] == 26 + 32 and counts["steer_generate"] == 42 and counts["feature_attribution"] == 4
    # the data and the judge check are shared, not planned twice; the harm-category study reads
    # CatQA (features, clamps) and OR-Bench (circuits; its three pinned files)
    assert counts["judge_preflight"] == 1 and counts["build_promptsets"] == 7
    # refusal_direction splits, 3 benchmarks, alpaca, CatQA, OR-Bench, ARC-Challenge, MMLU, GSM8K, WMDP bio/cyber
    assert counts["download_dataset"] == 6 + 3 + 1 + 1 + 3 + 3 + 2
    by_model = {}
    for rule, res, _ in jobs:
        if rule == "feature_attribution":
            by_model.setdefault(res["mem_mb"], set()).add(int(res["gpu"]))
    assert sorted(map(sorted, by_model.values())) == [[1], [2]]


def test_a_model_override_is_validated_like_the_config(tmp_path):
    cfg = yaml.safe_load((ROOT / "config/gemma-2-2b-it.yaml").read_text())
    cfg["models"]["gemma-2-2b-it"]["overrides"]["steering"] = {"k_star": -1}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(ROOT / "workflow/Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(bad), "--replace-workflow-config"],
        capture_output=True, text=True, cwd=ROOT, env=OFFLINE, timeout=300,
    )
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "k_star" in out and "-1 is less than the minimum" in out, out[-2000:]


def test_drmaa_profile_loads_its_plugin_and_plans_the_dag_with_every_native_resource(tmp_path):
    from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry

    plugin = ExecutorPluginRegistry().get_plugin("drmaa")
    assert plugin.common_settings.non_local_exec
    profile = yaml.safe_load((ROOT / "profiles/slurm-drmaa/config.yaml").read_text())
    assert profile["executor"] == "drmaa"
    jobs = plan(tmp_path, "--profile", "profiles/slurm-drmaa", "--configfile", str(ROOT / "config/paper.yaml"),
                "--replace-workflow-config")
    assert len(jobs) > 300
    native = {}
    for rule, res, threads in jobs:
        spec = profile["drmaa-args"].replace("{resources.", "{").format(**res, threads=threads)
        native.setdefault(rule, set()).add(re.search(r"--gres=gpu:(\d+)", spec).group(1))
        assert re.fullmatch(r"--mem=\d+ --time=\d+ --cpus-per-task=\d+ --gres=gpu:\d", spec), spec
    assert native["feature_attribution"] == {"1", "2"} and native["build_promptsets"] == {"0"}


@pytest.mark.parametrize("profile", ["slurm", "slurm-drmaa"])
def test_cluster_profiles_plan_the_embedded_default(tmp_path, profile):
    jobs = plan(tmp_path, "--profile", f"profiles/{profile}", "--configfile", str(ROOT / "config/config.yaml"))
    # the embedded model computes on the CPU: no job asks the cluster for a GPU
    assert jobs and all(int(res.get("gpu", 0)) == 0 for _, res, _ in jobs)


def test_local_and_transductive_conditions_are_evaluated_on_the_feature_promptset_only(tmp_path):
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    methods, feature_set = cfg["evaluation"]["methods"], cfg["features"]["promptsets"][0]
    assert len(cfg["evaluation"]["promptsets"]) > 1 and any("-local-" in m for m in methods)
    evaluated = {}
    for rule, block in planned_blocks(tmp_path, "--configfile", str(ROOT / "config/config.yaml")):
        if rule == "steer_generate":
            promptset, method = re.search(r"wildcards: model=[^,]+, promptset=([^,]+), method=([^,]+),", block).groups()
            evaluated.setdefault(promptset, set()).add(method)
    assert set(evaluated) == set(cfg["evaluation"]["promptsets"])
    assert evaluated.pop(feature_set) == set(methods)
    for promptset, got in evaluated.items():
        assert got == {m for m in methods if "-local-" not in m and "transductive" not in m}, promptset


def test_ci_runs_the_foundation_of_the_embedded_default_and_nothing_of_the_sae_study(tmp_path):
    default = str(ROOT / "config/config.yaml")
    jobs = plan(tmp_path, "foundation", "--configfile", default, str(ROOT / ".ci/embedded-ci.yaml"))
    counts = Counter(rule for rule, _, _ in jobs)
    # the organism, its direction, and Base and AS on the bundled held-out set that CI gates
    assert counts["refusal_tune"] == 1 and counts["base_refusal"] == 1 and counts["refusal_direction"] == 1
    assert counts["cache_activations"] == 1 and counts["baselines_table"] == 1
    assert counts["steer_generate"] == 2 and counts["judge"] == 2
    assert counts["organism_figure"] == 1 and counts["direction_figure"] == 1
    study = {"sae_corpus", "train_sae", "sae_quality", "feature_attribution", "capabilities"}
    assert not (study | {"judge_fourlabel"}) & set(counts)  # the gate reads the substring judge
    # the full default plans all of it, the foundation included
    (tmp_path / "full").mkdir()
    full = Counter(rule for rule, _, _ in plan(tmp_path / "full", "--configfile", default))
    assert all(full[rule] >= n for rule, n in counts.items() if rule != "foundation")
    assert full["train_sae"] == 5 and full["feature_attribution"] == 2


def test_the_default_profile_applies_from_any_working_directory_and_all_builds_every_sae(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(ROOT / "workflow/Snakefile"), "--directory",
         str(tmp_path / "work"), "--configfile", str(ROOT / "config/config.yaml")],
        capture_output=True, text=True, cwd=elsewhere, env=OFFLINE, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"workflow specific profile {ROOT / 'workflow/profiles/default'}" in res.stdout + res.stderr
    # rerun-incomplete and the rerun triggers come from it, so an interrupted train_sae is rebuilt by
    # `all` itself: its directories are targets
    all_inputs = re.search(r"^rule all:\n\s+input: (.*)$", res.stdout, re.M).group(1).split(", ")
    layers = yaml.safe_load((ROOT / "config/config.yaml").read_text())["models"]["smollm2-135m"]["sae"]["layers"]
    assert {f"results/saes/smollm2-135m/layer_{l}" for l in layers} <= set(all_inputs)


def test_the_paper_configs_plan_the_full_dag_on_local_sae_lens_directories(tmp_path):
    """A cluster user with Gemma Scope and Llama Scope already on disk points sae.path at them;
    the DAG build reads only each directory's cfg.json, so the plan needs no weights."""
    import json

    cfg = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    for name, spec in cfg["models"].items():
        d_model = spec["shape"]["d_model"]
        layers = spec["sae"]["layers"]
        for layer in layers:
            d = tmp_path / "saes" / name / f"layer_{layer}"
            d.mkdir(parents=True)
            (d / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": d_model, "d_sae": 16384,
                                                    "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post"}}))
        spec["sae"] = {"source": "local", "path": str(tmp_path / "saes" / name / "layer_{layer}"), "layers": layers}
    path = tmp_path / "paper-local.yaml"
    path.write_text(yaml.safe_dump(cfg))
    jobs = plan(tmp_path / "work", "--profile", "profiles/slurm", "--configfile", str(path),
                "--replace-workflow-config")
    counts = Counter(rule for rule, _, _ in jobs)
    assert counts["local_sae"] == 26 + 32 and "pretrained_sae" not in counts and counts["sae_quality"] == 26 + 32
    assert counts["steer_generate"] == 42 and counts["feature_attribution"] == 4 and counts["judge_harmbench"] == 42
    assert gpus_by_rule(jobs)["local_sae"] == {0}


def test_prefetch_plans_every_download_and_the_hub_artefacts_without_a_gpu(tmp_path):
    blocks = planned_blocks(tmp_path, "--profile", "profiles/slurm", "--configfile", str(ROOT / "config/paper.yaml"),
                            "--replace-workflow-config", "prefetch")
    counts = Counter(rule for rule, _ in blocks)
    # the same 19 dataset files the paper run downloads, and one job for the hub
    assert counts == {"download_dataset": 19, "prefetch_hub": 1, "prefetch": 1}
    for rule, block in blocks:
        assert "gpu=" not in block or "gpu=0" in block, rule
    # the Snakefile keeps them on the submitting node, where the internet is
    local = re.search(r"^localrules:\n((?:    \w+,\n)+)", (ROOT / "workflow/Snakefile").read_text(), re.M).group(1)
    assert {"prefetch", "prefetch_hub", "download_dataset"} <= {r.strip(" ,") for r in local.splitlines()}


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


# every key where the reference protocol differs from the project's, and its reference value
REFERENCE_SWITCHES = {
    "evaluation.fit_on": "each_promptset",
    "evaluation.methods": ["base", "cossim-global-transductive", "actdiff-global-transductive",
                           "ap-local-transductive", "la_ig-local-transductive", "as"],
    "capabilities.methods": ["base", "as", "cossim-global-transductive", "actdiff-global-transductive",
                             "ap-global-transductive", "la_ig-global-transductive"],
    "features.la_ig_path": "nested", "features.la_ig_positions": "after_header",
    "features.la_ig_patch_error": "pre_ablation", "direction.sink_dims": 0, "direction.filter": "refusal_score",
    "capabilities.choice_protocol": "prefill_greedy", "capabilities.gsm8k_protocol": "reasoning_then_answer",
    "capabilities.gsm8k_max_new_tokens": 512, "capabilities.benchmarks": ["arc_challenge", "gsm8k"],
    "capabilities.benchmark_max_items.arc_challenge": None, "capabilities.benchmark_max_items.gsm8k": None,
    "capabilities.benchmark_max_items.mmlu": 1000, "capabilities.ce_reduction": "reference_batch",
    "capabilities.ce_text": "pile", "capabilities.max_texts": 1000, "capabilities.max_text_tokens": 256,
    "categories.categories": ["illegal_activity", "child_abuse", "hate_harass_violence", "physical_harm",
                              "economic_harm", "fraud_deception", "adult_content"],
    "categories.pin_other_set": True, "categories.max_new_tokens": 256, "categories.max_prompts": 25,
    "categories.eval_max_prompts": 25, "promptsets.catqa.split_fractions.train": 0.5,
    "promptsets.catqa.split_fractions.val": 0.0, "promptsets.catqa.split_fractions.test": 0.5,
    "guardrails.unlearning.gate_edit": "all_selected", "guardrails.unlearning.q_values": [95],
    "guardrails.unlearning.n_values": [20, 50, 100, 200], "guardrails.unlearning.c_values": [500],
    "guardrails.unlearning.max_tokens": 1024, "guardrails.unlearning.layer": 3,
    "guardrails.unlearning.multiple_choice.forget": ["wmdp_bio"],
    "guardrails.unlearning.multiple_choice.retain_subjects": ["high_school_us_history", "college_computer_science",
                                                              "high_school_geography", "human_aging"],
    "judges.harmbench.clip_tokens": None, "judges.harmbench.unparsed": "not_jailbroken",
    "judges.harmbench.prompt": "reference", "judges.harmbench.stages": ["category_steering"],
    "models.gemma-2-2b-it.sae.gate.release": "gemma-scope-2b-pt-res",
    "models.gemma-2-2b-it.sae.gate.sae_id": "layer_3/width_16k/average_l0_142",
    "categories.c_by_condition.specific": -3, "categories.c_by_condition.common": -3,
    "categories.c_by_condition.transfer": -3, "categories.circuits.error_nodes": "nodes",
    "categories.circuits.submodules": ["attn", "mlp", "resid"],
}


def test_the_reference_config_differs_from_the_paper_config_only_by_the_ledger_s_switches(tmp_path):
    """Both models, prompt sets and judges are the same, so the two runs compare row by row; the
    reference config plans per-benchmark directions and local sets, the nested LA-IG, pinned §4.2
    clamps and the reference guardrail grid."""
    ours = _flat(yaml.safe_load((ROOT / "config/paper.yaml").read_text()))
    ref = _flat(yaml.safe_load((ROOT / "config/paper-reference.yaml").read_text()))
    differ = {k: ref.get(k, "<absent>") for k in set(ours) | set(ref) if ours.get(k, "<absent>") != ref.get(k, "<absent>")}
    assert differ == REFERENCE_SWITCHES
    blocks = planned_blocks(tmp_path, "--profile", "profiles/slurm", "--configfile",
                            str(ROOT / "config/paper-reference.yaml"), "--replace-workflow-config")
    counts = Counter(rule for rule, _ in blocks)
    # per model: both protocols on refusal_direction, and each benchmark's own transductive fit
    assert counts["feature_attribution"] == 2 * (2 + 3) and counts["category_steering"] == 2
    assert counts["steer_generate"] == 2 * 3 * 6 and counts["guardrail_select"] == 2 and counts["capabilities"] == 12
    for bench in ("harmbench", "jailbreakbench", "advbench"):
        fits = [b for r, b in blocks if r == "feature_attribution" and f"/{bench}/attribution." in b]
        assert len(fits) == 2 and all("transductive" in b and "refusal_direction.safetensors" in b for b in fits)
        [ablate] = [b for r, b in blocks if r == "steer_generate" and f"gemma-2-2b-it/{bench}/as/" in b]
        assert f"results/features/gemma-2-2b-it/{bench}/attribution.transductive.json" in ablate
        [local] = [b for r, b in blocks if r == "steer_generate" and f"gemma-2-2b-it/{bench}/la_ig-local-" in b]
        assert f"results/features/gemma-2-2b-it/{bench}/la_ig.parquet" in local
    # Gemma's gate reads its own 16k SAE at layer 3; Llama's, the study's SAEs
    [gate] = [b for r, b in blocks if r == "gate_sae"]
    assert "output: results/saes/gemma-2-2b-it/gate" in gate
    for rule in ("guardrail_select", "guardrail_eval"):
        gemma = [b for r, b in blocks if r == rule and "gemma-2-2b-it" in b]
        llama = [b for r, b in blocks if r == rule and "llama-3.1-8b-instruct" in b]
        assert gemma and all("results/saes/gemma-2-2b-it/gate" in b and "layer_3" not in b for b in gemma)
        assert llama and all("results/saes/llama-3.1-8b-instruct/layer_3" in b for b in llama)
    # §4.2 is judged by the classifier inside the category job, with the reference's prompt body
    for b in (b for r, b in blocks if r == "category_steering"):
        assert "results/judges/harmbench.preflight.json" in b and "refusal_sae/utils/eval_refusal.py" in b
    # the classifier reads the reference's prompt body from its pinned source file, downloaded once
    template = "resources/datasets/refusal_sae/utils/eval_refusal.py"
    judged = [b for r, b in blocks if r == "judge_harmbench"]
    assert judged and all(template in b for b in judged)
    assert [b for r, b in blocks if r == "download_dataset" and f"output: {template}" in b]
    # Marks et al.'s graph: the circuits read each layer's attention and MLP SAEs, from their releases
    [circ] = [b for r, b in blocks if r == "circuits" and "gemma-2-2b-it" in b]
    assert "results/saes/gemma-2-2b-it/attn_0" in circ and "results/saes/gemma-2-2b-it/mlp_25" in circ
    subs = [b for r, b in blocks if r == "submodule_sae"]
    assert len(subs) == 2 * (26 + 32) and not any("corpus" in b for b in subs)
    # CE's generic text is the Pile's head, streamed once from its pinned shard, not the SAE corpus
    pile = "resources/datasets/pile_uncopyrighted/train/00.head1000.jsonl"
    caps = [b for r, b in blocks if r == "capabilities"]
    assert caps and all(pile in b and "corpus/sequences.parquet" not in b for b in caps)
    assert [b for r, b in blocks if r == "download_dataset" and f"output: {pile}" in b]
    # and both are fetched by `prefetch` on the submitting node, where the internet is
    pre = planned_blocks(tmp_path, "--profile", "profiles/slurm", "--configfile",
                         str(ROOT / "config/paper-reference.yaml"), "--replace-workflow-config", "prefetch")
    fetched = [b for r, b in pre if r == "download_dataset"]
    assert all(any(f"output: {p}" in b for b in fetched) for p in (pile, template))
