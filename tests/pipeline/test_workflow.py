"""The whole DAG on the tiny .test config, through the real download path (local HTTP mirror).

The model is a tiny random Gemma-2 with Gemma's chat format (no system role, ``<end_of_turn>``,
soft-capping, a sliding window shorter than the prompts): the family of the paper's first model,
and the one whose format differs most from the embedded default's ChatML, which the family
matrix (test_families_dag.py) runs through the DAG's core.

Where a SLURM cluster can be started (root and Debian's slurm-wlm; always in CI), the DAG runs
through ``--profile profiles/slurm`` on a real single-node cluster (tests/slurm_cluster.py), and
the later tests rerun and plan on its outputs locally. Elsewhere it runs with ``--cores 2``.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import FAMILY_CORPUS, ROOT
from sae_lens import SAE
from safetensors import safe_open
from safetensors.torch import load_file
from slurm_cluster import missing_requirements, slurm_cluster

from refusal_atlas.testing.families import FAMILIES, save_tiny_chat_model

pytestmark = pytest.mark.workflow

# Every rule that runs a model; the others are CPU rules or local rules (workflow/Snakefile).
GPU_RULES = {"base_refusal", "refusal_tune", "organism_card", "cache_activations",
             "refusal_direction", "sae_corpus", "train_sae",
             "sae_quality", "feature_attribution", "steering_search", "steer_generate", "capabilities",
             "adversarial_responses", "jailbreak_mechanism", "guardrail_select", "guardrail_eval",
             "refusal_guardrail", "feature_dashboards", "category_features", "category_steering",
             "circuits"}


def _configfiles(config):
    """One config file, or several merged in order (an overlay over the .test config)."""
    return [str(c) for c in config] if isinstance(config, (list, tuple)) else [str(config)]


def snakemake(workdir, config, *extra):
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow/Snakefile"),
         "--configfile", *_configfiles(config),
         "--directory", str(workdir), "--cores", "2", "--show-failed-logs", *extra],
        capture_output=True, text=True,
    )


def slurm_command(cluster, workdir, config, *extra):
    """The user's command, `--profile profiles/slurm`, with the test cluster's site settings."""
    partitions = workdir / "partitions.yaml"
    partitions.write_text(yaml.safe_dump({"partitions": {cluster.partition: {
        "max_gpu": cluster.gpus, "max_mem_mb": cluster.mem_mb, "max_cpus_per_task": cluster.cpus}}}))
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow/Snakefile"), "--configfile",
            *_configfiles(config), "--directory", str(workdir), "--profile", str(ROOT / "profiles/slurm"),
            # no accounting database here: poll with squeue, charge no account
            "--slurm-status-command", "squeue", "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "1",
            "--slurm-partition-config", str(partitions), "--slurm-keep-successful-logs", "--local-cores", "2", *extra]


def snakemake_slurm(cluster, workdir, config, *extra):
    return subprocess.run(slurm_command(cluster, workdir, config, *extra), capture_output=True, text=True,
                          env=cluster.env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing_requirements()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the DAG on a real SLURM cluster, but {why}")
        yield None
        return
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def tiny_config(work, model_dir, mirror_url, **models_extra):
    cfg = yaml.safe_load((ROOT / ".test/config/config.yaml").read_text())
    cfg["models"]["tiny"].update(path=str(model_dir), **models_extra)
    cfg["datasets"]["mirror"] = mirror_url
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory, mirror_url, cluster):
    """A run whose one job fails, started on the cluster beside the DAG: it spends most of its
    time waiting on the executor's status polls, which would otherwise add to the suite's time."""
    if cluster is None:
        yield None
        return
    work = tmp_path_factory.mktemp("failing")
    # it passes the checks made before any job (a config.json and a chat template) but holds no
    # weights or tokenizer, so the first job fails on the cluster
    not_a_model = work / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    (not_a_model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    path = tiny_config(work, not_a_model, mirror_url)
    with open(work / "stdout", "w") as out, open(work / "stderr", "w") as err:
        proc = subprocess.Popen(slurm_command(cluster, work, path, "results/models/tiny/base"), stdout=out,
                                stderr=err, text=True, env=cluster.env)
    yield work, not_a_model, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def gemma_model_dir(tmp_path_factory):
    # the name must not hold "gemma" or "llama": TransformerLens reads it as an architecture hint
    return save_tiny_chat_model(FAMILIES["gemma2"], tmp_path_factory.mktemp("tiny-g2"), FAMILY_CORPUS)


@pytest.fixture(scope="module")
def run(tmp_path_factory, gemma_model_dir, mirror_url, cluster, failing_run):
    # failing_run is asked for only so that it is started before the DAG, and runs beside it
    work = tmp_path_factory.mktemp("work")
    if cluster is None:
        path = tiny_config(work, gemma_model_dir, mirror_url)
        res = snakemake(work, path)
        assert res.returncode == 0, res.stderr[-5000:]
        return work, path, None
    # The tiny model computes on the CPU; asking for one GPU per model rule (a scheduling key,
    # so no rerun) shows that GPU rules reach GPU slots and CPU rules none.
    path = tiny_config(work, gemma_model_dir, mirror_url, gpus=1)
    res = snakemake_slurm(cluster, work, path)
    assert res.returncode == 0, res.stderr[-8000:] + cluster.log("slurmctld")[-3000:]
    # the failing run beside it has jobs of its own on the cluster
    return work, path, [j for j in cluster.jobs() if j.get("WorkDir") == str(work)]


def test_data_outputs_follow_the_contracts(run):
    """The prompt sets carry the contract columns and every split."""
    work, _, _ = run
    ps = pd.read_parquet(work / "results/promptsets/refusal_direction.parquet")
    assert {"id", "instruction", "category", "label", "source", "split"} <= set(ps.columns)
    assert len(ps) == 2 * (12 + 8 + 8)
    assert (work / "resources/datasets/refusal_direction/splits/harmful_train.json").exists()


def test_model_outputs_follow_the_contracts(run):
    """The model card has every rate with n and interval, and the training record."""
    work, _, _ = run
    card = json.loads((work / "results/models/tiny/model_card.json").read_text())
    for stage in ("base", "tuned"):
        rates = card["refusal_rate"][stage]
        assert {"bundled/harmful/plain", "bundled/harmless/twin", "refusal_direction/harmful/plain"} <= set(rates)
        for r in rates.values():
            assert r["n"] > 0 and r["ci_low"] <= r["rate"] <= r["ci_high"]
    assert set(card["targets"]) >= {"bundled/harmful/plain", "refusal_direction/harmless/plain",
                                    "contrast/harmless/twin", "contrast/harmful/plain"}
    # the contrast set's safe prompts per type, before and after, each with its own goal
    typed = {k for k in card["refusal_rate"]["tuned"] if k.startswith("contrast/harmless/twin/")}
    assert len(typed) == 10 and typed <= set(card["refusal_rate"]["base"]) and typed <= set(card["targets"])
    assert card["training"]["steps"] > 0


def test_activations_outputs_follow_the_contracts(run):
    """One row of activations per indexed prompt, on every layer."""
    work, _, _ = run
    acts = load_file(work / "results/activations/tiny/bundled.safetensors")["resid_post"]
    index = pd.read_parquet(work / "results/activations/tiny/bundled.index.parquet")
    assert acts.shape == (len(index), 4, 64) and (index.row == range(len(index))).all()


def test_direction_outputs_follow_the_contracts(run):
    """One direction per layer and one chosen l*."""
    work, _, _ = run
    info = json.loads((work / "results/directions/tiny.json").read_text())
    d = load_file(work / "results/directions/tiny.safetensors")
    assert d["direction"].shape == (4, 64) and 0 <= info["layer"] < 4
    layers = pd.read_parquet(work / "results/directions/tiny.layers.parquet")
    assert layers.chosen.sum() == 1


def test_steering_outputs_follow_the_contracts(run):
    """Every condition generates on its own prompts, in shards, with the tuned c where it has none."""
    work, _, _ = run
    index = pd.read_parquet(work / "results/activations/tiny/bundled.index.parquet")
    cfg = yaml.safe_load((ROOT / ".test/config/config.yaml").read_text())
    methods = cfg["evaluation"]["methods"]
    summary = pd.read_csv(work / "results/scores/tiny/summary.csv")
    assert set(summary.method) == set(methods) and set(summary.promptset) == {"bundled"}
    assert (summary.n > 0).all() and ((summary.ci_low <= summary.rate) & (summary.rate <= summary.ci_high)).all()
    gens = pd.read_parquet(work / "results/generations/tiny/bundled/as.parquet")
    assert (gens.split == "test").all() and gens.generation.notna().all() and set(gens.label) == {"harmful"}
    shards = [pd.read_parquet(work / f"results/generations/tiny/bundled/as/shard-{i}.parquet") for i in (0, 1)]
    assert sorted(pd.concat(shards).id) == sorted(gens.id) and all(len(sh) for sh in shards)
    assert set(pd.read_parquet(work / "results/generations/tiny/bundled/base.parquet").label) == {"harmful", "harmless"}
    assert set(pd.read_parquet(work / "results/generations/tiny/bundled/la_ig-global-heldout-s2.parquet").label) == {
        "harmless"}
    local = pd.read_parquet(work / "results/generations/tiny/bundled/random-local-transductive-k3-xm2.parquet")
    eval_plain = index[(index.split == "test") & (index.label == "harmful") & (index.variant == "plain")]
    assert set(local.id) == set(eval_plain.id)
    assert json.loads(local.condition.iloc[0]) == {"k_star": 3, "mode": "multiply", "value": -2.0, "n_features": 3}
    assert (work / "results/tables/baselines.csv").exists()

    hp = json.loads((work / "results/steering/tiny/hparams.json").read_text())
    assert hp["chosen"]["c"] in (-1, -2) and hp["chosen"]["k_star"] in (2, 5)
    sweep = pd.read_csv(work / "results/steering/tiny/sweep.csv")
    assert len(sweep) == 1 + 4 and sweep.chosen.sum() == 1
    tuned = pd.read_parquet(work / "results/generations/tiny/bundled/la_ig-global-heldout.parquet")
    assert json.loads(tuned.condition.iloc[0])["value"] == hp["chosen"]["c"]


def test_scoring_outputs_follow_the_contracts(run):
    """The benchmark and induction tables hold every condition with n and interval."""
    work, _, _ = run
    cfg = yaml.safe_load((ROOT / ".test/config/config.yaml").read_text())
    methods = cfg["evaluation"]["methods"]
    bench = pd.read_csv(work / "results/tables/benchmark.csv")
    assert set(bench.method) == {m for m in methods if m != "add" and "-s" not in m}
    assert ((bench.ci_low <= bench.jailbreak_rate) & (bench.jailbreak_rate <= bench.ci_high)).all() and (bench.n > 0).all()
    assert set(bench[bench.method == "la_ig-global-heldout"].name) == {"LA-IG (Ours)"}
    # the four-label judge's jailbreak is compliance, with its corrected rate and the other labels
    four = bench[bench.judge == "fourlabel"]
    assert set(bench.judge) == {"substring", "fourlabel"} and set(four.method) == set(bench.method)
    labels = four[["jailbreak_rate", "evasive_rate", "degenerate_rate", "refusal_rate"]].sum(axis=1)
    assert np.allclose(labels, 1.0) and four.jailbreak_corrected.dropna().between(0, 1).all()
    agreement = pd.read_csv(work / "results/judges/agreement.csv")
    assert set(agreement.judge) == {"fourlabel", "substring"} and (agreement.n >= 150).all()
    assert "four-label" in json.loads((work / "results/steering/tiny/hparams.json").read_text())["rule"]
    induction = pd.read_csv(work / "results/tables/induction.csv")
    assert set(induction.method) == {"base", "add", "la_ig-global-heldout-s2"} and set(induction.label) == {"harmless"}
    for fig in ("benchmark", "induction"):
        assert (work / f"results/figures/{fig}.png").stat().st_size > 0 and (work / f"results/figures/{fig}.svg").exists()


def test_capabilities_outputs_follow_the_contracts(run):
    """Capabilities are measured for every global held-out condition."""
    work, _, _ = run
    cfg = yaml.safe_load((ROOT / ".test/config/config.yaml").read_text())
    methods = cfg["evaluation"]["methods"]
    cap = pd.read_csv(work / "results/tables/capabilities_tiny.csv")
    assert set(cap.method) == {m for m in methods if "-local-" not in m and "transductive" not in m}
    assert set(cap.measure) == {"response_ce", "text_ce"} and (cap.n > 0).all() and (cap["mean"] > 0).all()
    assert (cap[cap.method == "base"].delta_vs_base == 0).all()


def test_saes_outputs_follow_the_contracts(run):
    """Every configured layer has an SAELens SAE and a quality row."""
    work, _, _ = run
    for layer in (1, 3):
        sae = SAE.load_from_disk(work / f"results/saes/tiny/layer_{layer}")
        assert sae.cfg.d_sae == 128 and sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
    quality = pd.read_csv(work / "results/saes/tiny/quality.csv")
    assert sorted(quality.layer) == [1, 3]
    assert ((quality.ce_clean > 0) & (quality.ce_zero > 0) & (quality.l0 <= 8) & (quality.n_tokens > 0)).all()
    # a random tiny model barely varies around its mean, so only the bound is checkable here
    assert (quality.explained_variance <= 1).all() and "meets_targets" in quality


def test_features_outputs_follow_the_contracts(run):
    """Each selector ranks K* features per protocol and scope; Ours picks within the top k0."""
    work, _, _ = run
    index = pd.read_parquet(work / "results/activations/tiny/bundled.index.parquet")
    eval_harmful = set(index[(index.split == "test") & (index.label == "harmful") & (index.variant == "plain")].id)
    for method in ("cossim", "actdiff", "ap", "la_ig"):
        feats = pd.read_parquet(work / f"results/features/tiny/bundled/{method}.parquet")
        assert set(feats.protocol) == {"transductive", "heldout"}
        assert {"layer", "feature", "score", "rank", "cos_r", "mean_act_harmful", "mean_act_harmless"} <= set(feats)
        for _, g in feats.groupby(["protocol", "scope", "prompt_id"], dropna=False):
            assert list(g["rank"]) == [1, 2, 3, 4, 5] and g.score.is_monotonic_decreasing
        assert set(feats[feats.scope == "local"].prompt_id) == eval_harmful
        assert set(feats.layer) <= {1, 3}
    la = pd.read_parquet(work / "results/features/tiny/bundled/la_ig.parquet")
    for protocol in ("transductive", "heldout"):
        # "Ours" only picks among each layer's top-k0 latents by cosine with r
        ev = load_file(work / f"results/features/tiny/bundled/attribution.{protocol}.safetensors")
        layers = ev["layers"].tolist()
        for row in la[la.protocol == protocol].itertuples():
            cos = ev["cos"][layers.index(row.layer)]
            assert int((cos > cos[row.feature]).sum()) < 4
    info = json.loads((work / "results/features/tiny/bundled/attribution.heldout.json").read_text())
    assert info["fit_split"] == "train" and info["n"]["fit_harmful"] == 8
    assert (work / "results/tables/features_tiny.csv").exists()


def test_probes_outputs_follow_the_contracts(run):
    """Jailbreak pairs, their mechanism and the probes, with n and intervals."""
    work, _, _ = run
    la = pd.read_parquet(work / "results/features/tiny/bundled/la_ig.parquet")
    answers = pd.read_parquet(work / "results/probes/tiny/responses.parquet")
    # one wrapper and one suffix per request (.test sets adversarial_suffixes); each plain parent once
    assert set(answers.variant) == {"plain", "jailbreak"} and answers.pair_id.value_counts().eq(3).all()
    assert answers.id.is_unique and answers[answers.variant == "jailbreak"].id.str.contains("-jb-suffix-").sum() > 0
    assert set(answers.judge) == {"fourlabel"} and (answers.refused == (answers.verdict == "refusal")).all()
    mech = pd.read_csv(work / "results/probes/tiny/mechanism.csv")
    pairs = pd.read_parquet(work / "results/probes/tiny/mechanism_pairs.parquet")
    assert set(mech.features) <= {"harm", "refusal"} and set(mech.outcome) <= {"success", "failed"}
    assert mech.groupby("outcome").n.first().to_dict() == pairs.outcome.value_counts().drop(
        "plain_answered", errors="ignore").to_dict()
    harm = pd.read_parquet(work / "results/probes/tiny/harm_features.parquet")
    refusal = la[(la.scope == "global") & (la.protocol == "heldout")]
    assert len(harm) == 5 and not set(zip(harm.layer, harm.feature)) & set(zip(refusal.layer, refusal.feature))
    probes = pd.read_parquet(work / "results/probes/tiny/probes.parquet")
    assert set(probes.probe) == {"refusal_features", "random_features", "dense"}
    assert probes[probes.probe == "random_features"].random_set.nunique() == 10
    dense_layer = pd.read_csv(work / "results/probes/tiny/dense_layers.csv").query("chosen").layer.item()
    assert (probes[probes.probe == "dense"].layer == dense_layer).all()
    acc = probes[(probes.metric == "accuracy")]
    assert acc.value.between(0, 1).all() and (acc.ci_low <= acc.value).all() and (acc.n > 0).all()


def test_guardrails_outputs_follow_the_contracts(run):
    """Both guardrails report every mode and condition with n and intervals."""
    work, _, _ = run
    unlearn = pd.read_csv(work / "results/guardrails/tiny/unlearning.csv")
    assert set(unlearn["mode"]) == {"dynamic", "static"} and (unlearn.retain_n > 0).all()
    scores = json.loads((work / "results/guardrails/tiny/unlearning_score.json").read_text())
    assert (unlearn.tau >= 0).all() and "score" in scores["dynamic"]
    for part in ("forget", "retain"):  # relative accuracy is undefined where the unmodified model scores 0
        assert unlearn[f"{part}_accuracy"].notna().all() or scores["base_accuracy"][part] == 0
        assert unlearn[f"{part}_abs_accuracy"].between(0, 1).all() and unlearn[f"{part}_ce_delta"].notna().all()
    assert (unlearn[unlearn["mode"] == "static"].forget_gated == 1).all()
    for weights in ("tuned", "base"):  # the organism and the untuned model it was tuned from
        guard = pd.read_csv(work / f"results/guardrails/tiny/refusal_{weights}.csv")
        conditions = {"base", "guard-set", "guard-add", "always-set", "always-add"}
        # the untuned weights get their own behavioural r, unless they refuse too little to fit one
        log = (work / f"logs/refusal_guardrail/tiny.{weights}.log").read_text()
        assert ("own direction: the weights refuse" in log) == (weights == "base")
        if weights == "base" and "no own direction" not in log:
            conditions |= {"guard-add-own", "always-add-own"}
        assert set(guard.condition) == conditions
        assert set(guard.variant) == {"plain", "twin", "bait"} and (guard.n > 0).all()
        assert (guard[guard.condition == "base"].added_refusal == 0).all()
        assert (guard.added_ci_low <= guard.added_refusal + 1e-9).all()
        assert (guard.added_refusal <= guard.added_ci_high + 1e-9).all()
        # refusal is the four-label judge's, corrected for its error, the other labels beside it
        assert set(guard.judge) == {"fourlabel"} and guard.refusal_corrected.dropna().between(0, 1).all()
        shares = guard[["refusal_rate", "compliance_rate", "evasive_rate", "degenerate_rate"]].sum(axis=1)
        assert np.allclose(shares, 1.0)
        assert (work / f"results/guardrails/tiny/refusal_{weights}.png").exists()
    for fig in ("mechanism", "probes"):
        assert (work / f"results/probes/tiny/{fig}.png").stat().st_size > 0
        assert (work / f"results/probes/tiny/{fig}.svg").exists()


def test_logs_outputs_follow_the_contracts(run):
    """Every rule that ran left a log and a benchmark."""
    work, _, _ = run
    for rule in ("base_refusal", "refusal_tune", "cache_activations", "refusal_direction", "steer_generate",
                 "sae_corpus", "train_sae", "sae_quality", "feature_attribution", "select_features", "steering_search",
                 "gather_generations", "capabilities", "benchmark_table", "induction_table", "adversarial_responses",
                 "jailbreak_mechanism", "probes", "guardrail_select", "guardrail_eval", "refusal_guardrail"):
        assert any((work / "logs").glob(f"{rule}*")) and any((work / "benchmarks").glob(f"{rule}*"))


def test_rerun_does_nothing_and_a_param_change_reruns_only_its_stage(run):
    work, path, _ = run
    dry = snakemake(work, path, "-n")
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr
    cfg = yaml.safe_load(path.read_text())
    cfg["evaluation"]["max_new_tokens"] = 5
    changed = work / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    dry = snakemake(work, changed, "-n", "--quiet", "rules")
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0
    assert "steer_generate" in out and "judge" in out
    for upstream in ("base_refusal", "refusal_tune", "cache_activations", "refusal_direction", "prepare_model",
                     "steering_search", "feature_attribution"):
        assert upstream not in out


def test_the_search_grid_reruns_the_search_and_tuned_clamps_only(run):
    work, path, _ = run
    cfg = yaml.safe_load(path.read_text())
    cfg["steering"]["search"]["c_values"] = [-1, -3]
    changed = work / "changed_search.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    dry = snakemake(work, changed, "-n")
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0 and "steering_search" in out
    assert "results/generations/tiny/bundled/la_ig-global-heldout/shard-0.parquet" in out
    for fixed in ("as/shard-0", "base/shard-0", "random-local-transductive-k3-xm2/shard-0", "add/shard-0"):
        assert f"results/generations/tiny/bundled/{fixed}.parquet" not in out


@pytest.fixture(scope="module")
def report(run):
    work, path, _ = run
    res = snakemake(work, path, "--report", str(work / "report.html"))
    assert res.returncode == 0, res.stderr[-3000:]
    return work / "report.html"


def _figures(work):
    """Every figure and table page the run wrote (the files a reader must find in the report)."""
    figures = sorted(p for ext in ("png", "svg") for p in (work / "results").rglob(f"*.{ext}"))
    pages = sorted((work / "results/dashboards").rglob("*.html"))
    return figures, pages


def test_report_builds(run, report):
    work, _, _ = run
    html = report.read_text(errors="replace")
    for name in ("summary.html", "baselines.html", "quality.html", "features_tiny.html", "benchmark.html",
                 "induction.html", "capabilities_tiny.html", "sweep.html", "mechanism.html", "suppressing_words.html",
                 "probes.html", "unlearning.html", "refusal_tuned.html", "features.html", "normalized_jailbreak.html",
                 "faithfulness.html", "similarity.html", "modularity_tests.html", "pairwise_tests.html", "verdict.html"):
        assert name in html, name
    figures, pages = _figures(work)
    assert {p.name for p in figures} >= {"benchmark.png", "induction.svg", "organism.png", "direction.svg",
                                         "sae_quality.png", "mechanism.png", "probes.svg", "unlearning.png",
                                         "refusal_base.png", "normalized_jailbreak.png", "faithfulness.svg",
                                         "similarity.png"}
    for p in figures + pages:
        assert p.name in html, f"{p.relative_to(work)} is not in the report"
    # every table is an HTML table, with its CSV inside as a download
    table = (work / "results/tables/benchmark.html").read_text()
    assert "<table" in table and "data:text/csv;base64," in table


def test_feature_dashboards(run):
    work, _, _ = run
    feats = pd.read_csv(work / "results/dashboards/tiny/features.csv")
    ranks = pd.concat(pd.read_parquet(p) for p in (work / "results/features/tiny/bundled").glob("*.parquet"))
    shown = set(zip(feats.layer, feats.feature))
    assert shown == set(zip(*ranks[ranks.scope == "global"][["layer", "feature"]].to_numpy().T))
    pages = sorted((work / "results/dashboards/tiny/pages").glob("*.html"))
    assert [p.name for p in pages] == sorted(feats.page)
    effects = pd.read_parquet(work / "results/dashboards/tiny/clamp_effects.parquet")
    hp = json.loads((work / "results/steering/tiny/hparams.json").read_text())["chosen"]
    alone = effects[effects.set == "alone"]
    assert len(alone) == hp["k_star"] and (effects.value == hp["c"]).all()
    assert (alone.ci_low <= alone.delta_refusal_score + 1e-9).all() and (alone.n > 0).all()
    page = pages[0].read_text()
    assert "Top-activating prompts" in page and "refusal direction" in page and "http" not in page
    assert "look unsafe" in page and "homonym" in page
    profile = pd.read_parquet(work / "results/dashboards/tiny/contrast.parquet")
    assert set(zip(profile.layer, profile.feature)) == shown and profile.type.nunique() == 11  # ten and "all"
    assert feats.contrast_safe_fire.between(0, 1).all() and feats.contrast_unsafe_fire.between(0, 1).all()


def test_harm_categories(run):
    """Per-category sets and clamps, a circuit file per category and group, faithfulness curves,
    the permutation test and a verdict with the numbers behind it."""
    import networkx as nx

    work, _, _ = run
    base = work / "results/categories/tiny"
    sets = pd.read_parquet(base / "features.parquet")
    conds = pd.read_parquet(base / "conditions.parquet")
    cats = sorted(sets.category.unique())
    common = json.loads((base / "features.json").read_text())["common"]
    assert len(cats) >= 2 and set(conds.condition) >= {"all", "specific", "transfer"}
    # an empty intersection leaves the common clamp with no row; it is still scored, as the base
    assert ("common" in set(conds.condition)) == bool(common)
    rates = pd.read_parquet(base / "steering.parquet")
    assert set(rates.condition) == {"base", "all", "specific", "common", "transfer"}
    by = rates.set_index(["condition", "category"]).jailbreak_rate
    if not common:
        assert (by["common"] == by["base"]).all() and (rates[rates.condition == "common"].n_features == 0).all()
    assert (rates.ci_low <= rates.jailbreak_rate + 1e-9).all() and (rates.n > 0).all()
    # a jailbreak is the four-label judge's compliance, with its corrected rate beside it
    assert set(rates.judge) == {"fourlabel"} and rates.jailbreak_corrected.dropna().between(0, 1).all()
    assert np.allclose(rates[["jailbreak_rate", "evasive_rate", "degenerate_rate", "refusal_rate"]].sum(axis=1), 1.0)
    assert (rates[rates.condition == "transfer"].groupby("category").source.nunique() == len(cats) - 1).all()
    for group in ("toxic", "safe"):
        for cat in cats:
            g = nx.read_graphml(base / "circuits" / group / f"{cat}.graphml")
            assert g.number_of_nodes() > 0 and g.graph["category"] == cat
            assert any(d["error"] for _, d in g.nodes(data=True))  # error nodes are part of every circuit
    curves = pd.read_csv(base / "faithfulness.csv")
    assert set(curves.group) == {"toxic", "safe"} and curves.n_per_layer.nunique() == 2
    assert np.isfinite(curves.m_model).all() and (curves.split == "test").all()
    verdict = json.loads((base / "verdict.json").read_text())
    assert verdict["verdict"] in {"monolithic", "modular", "mixed"}
    toxic = verdict["by_group"]["toxic"]
    assert 0 < toxic["p_value"] <= 1 and toxic["n_permutations"] == 19 and len(toxic["ci"]) == 2
    tests = pd.read_csv(base / "modularity_tests.csv")
    assert set(tests.similarity) == {"jaccard", "weighted_jaccard", "edge_jaccard", "importance_r"}
    pairs = pd.read_csv(base / "pairwise_tests.csv")
    assert len(pairs[pairs.group == "toxic"]) == len(cats) * (len(cats) - 1) // 2
    assert (pairs.p_adjusted.dropna() >= pairs.p_value[pairs.p_adjusted.notna()] - 1e-12).all()


def test_the_report_renders_in_chromium(run, report, tmp_path):
    """Opened as a reader would: headless Chromium (Debian's), every category visited, a figure
    and a feature dashboard opened; no console error on the way."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must open the report in Chromium, but there is none (.ci/install.sh installs it)")
        pytest.skip("no chromium")
    from playwright.sync_api import sync_playwright

    categories = ["Baselines", "Feature dashboards", "Guardrails", "Harm categories", "Jailbreaks and probes", "Judges",
                  "Model", "Refusal direction", "Refusal features", "SAEs", "Steering"]
    errors, listed = [], {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
        page.goto(report.as_uri(), wait_until="load")
        page.wait_for_selector("text=Harm categories", timeout=30_000)
        page.screenshot(path=str(tmp_path / "report.png"))
        for category in categories:
            page.get_by_text(category, exact=True).first.click()
            page.wait_for_timeout(200)
            # a category lists its files, or its subcategories (a model, "All models") first
            listed[category] = page.locator("tr").count() + page.get_by_text("tiny", exact=True).count()
            page.get_by_text("Results", exact=True).first.click()
        page.get_by_text("Harm categories", exact=True).first.click()
        page.locator("tr", has_text="results/categories/tiny/similarity.png").first.locator("a").first.click()
        img = page.wait_for_selector("img[src^='data:image/png']", timeout=10_000)
        width = img.evaluate("i => i.naturalWidth")
        page.get_by_text("Results", exact=True).first.click()
        page.get_by_text("Feature dashboards", exact=True).first.click()
        page.locator("tr", has_text="001").first.locator("a").first.click()
        page.wait_for_timeout(500)
        frames = [f for f in page.frames if f != page.main_frame]
        dashboard = frames[0].inner_text("body") if frames else ""
        page.screenshot(path=str(tmp_path / "dashboard.png"))
        browser.close()
    assert not errors, errors
    assert all(n > 0 for n in listed.values()), listed  # every category lists its results
    assert width > 100
    assert "tiny · layer" in dashboard and "Top-activating prompts" in dashboard
    assert (tmp_path / "report.png").stat().st_size > 20_000  # a rendered page, not a blank one


def test_an_sae_knob_reruns_saes_and_features_but_not_the_organism(run):
    work, path, _ = run
    cfg = yaml.safe_load(path.read_text())
    cfg["models"]["tiny"]["sae"]["k"] = 6
    changed = work / "changed_sae.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    dry = snakemake(work, changed, "-n")
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0 and "rule train_sae" in out and "rule feature_attribution" in out
    for upstream in ("refusal_tune", "prepare_model", "sae_corpus", "refusal_direction"):
        assert f"rule {upstream}:" not in out
    # clamps read the SAEs and rerun; conditions without SAEs do not
    assert "results/generations/tiny/bundled/la_ig-global-heldout/shard-0.parquet" in out
    for fixed in ("base", "as", "add"):
        assert f"results/generations/tiny/bundled/{fixed}/shard-0.parquet" not in out


def test_a_training_knob_reruns_the_organism_but_not_its_baseline(run):
    work, path, _ = run
    cfg = yaml.safe_load(path.read_text())
    cfg["organism"]["lr"] = 2e-3
    changed = work / "changed_lr.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    dry = snakemake(work, changed, "-n", "--quiet", "rules")
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0 and "refusal_tune" in out and "refusal_direction" in out
    assert "base_refusal" not in out and "prepare_model" not in out and "build_promptsets" not in out


def test_slurm_jobs_asked_for_gpus_by_rule(run):
    work, _, jobs = run
    if jobs is None:
        pytest.skip("no SLURM cluster here (CI always has one)")
    by_rule = {}
    for job in jobs:
        rule = re.match(r"rule_([a-z_]+?)(?:_wildcards_|$)", job["Comment"]).group(1)
        assert job["JobState"] == "COMPLETED", job
        by_rule.setdefault(rule, []).append(job)
    assert GPU_RULES <= set(by_rule), sorted(by_rule)
    assert {"prepare_model", "build_promptsets", "select_features"} <= set(by_rule)
    for rule, rule_jobs in by_rule.items():
        for job in rule_jobs:
            asked = job.get("TresPerJob", "")
            assert (asked == "gres:gpu:1") == (rule in GPU_RULES), (rule, asked)
    # the jobs saw their allocation: a GPU rule's log names the GPU it was given
    log = next((work / "logs/refusal_tune").glob("*.log")).read_text()
    assert re.search(r"slurm job \d+ on localhost: \d+ cpus, 1 gpus \[\d\]", log), log[:500]
    log = next((work / "logs/prepare_model").glob("*.log")).read_text()
    assert "0 gpus []" in log
    # local rules stayed on the submitting node
    assert "download_dataset" not in by_rule and "benchmark_table" not in by_rule


def test_a_failing_slurm_job_fails_the_run_and_shows_its_log(failing_run):
    if failing_run is None:
        pytest.skip("no SLURM cluster here (CI always has one)")
    work, not_a_model, proc = failing_run
    returncode = proc.wait(timeout=600)
    out = (work / "stdout").read_text() + (work / "stderr").read_text()
    assert returncode != 0
    assert "Error in rule prepare_model" in out
    # --show-failed-logs prints the rule's own log: the job's params (naming the directory) and why
    assert str(not_a_model) in out and "stage failed" in out, out[-3000:]
    assert not (work / "results/models/tiny/base").exists()


def test_every_rule_reads_every_params_key_it_is_passed(run):
    """A key in a rule's params reruns the rule when edited, so one its stage never reads reruns it
    for nothing (and hides which settings a result depends on). The logs record each job's params."""
    from refusal_atlas.pipeline.code_version import stage_reads

    work, path, _ = run
    promptsets = yaml.safe_load(path.read_text())["promptsets"]
    checked, unread = set(), {}
    for log_file in sorted((work / "logs").rglob("*.log")):
        line = next((l for l in log_file.read_text().splitlines() if " params {" in l), None)
        rule = log_file.relative_to(work / "logs").parts[0]
        script = ROOT / "workflow/scripts" / f"{rule}.py"
        if line is None or not script.exists():
            continue
        params = json.loads(line.split(" params ", 1)[1])
        reads = stage_reads(script)
        for name, value in params.items():
            # maps keyed by data (a source per promptset) rather than by setting are read by key
            if isinstance(value, dict) and not set(value) <= set(promptsets):
                missing = sorted(set(value) - reads)
                if missing:
                    unread.setdefault(f"{rule}.{name}", missing)
        checked.add(rule)
    assert {"refusal_tune", "organism_card", "feature_attribution", "steer_generate", "judge"} <= checked
    assert len(checked) >= 30, sorted(checked)
    assert not unread, unread


# Built once by the .test run and only read by the reference protocol's run.
REUSED = ("results/models/tiny/tuned/model.safetensors", "results/activations/tiny/bundled.safetensors",
          "results/saes/tiny/layer_1/sae_weights.safetensors", "results/directions/tiny.safetensors")
REFERENCE_TARGETS = ("results/tables/benchmark.csv", "results/categories/tiny/normalized_jailbreak.csv",
                     "results/guardrails/tiny/unlearning.csv", "results/categories/tiny/similarity.csv")


def _last_params(work, rule):
    lines = [l for f in sorted((work / "logs" / rule).rglob("*.log")) for l in f.read_text().splitlines()
             if " params {" in l]
    return json.loads(lines[-1].split(" params ", 1)[1])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, run, cluster):
    """.test/config-reference over the .test config, run through the same cluster in a copy of the
    .test run (as a user runs config/organism-reference.yaml in a copy of a default run)."""
    work, path, _ = run
    ref = tmp_path_factory.mktemp("reference") / "work"
    # copy2 keeps mtimes and .snakemake keeps the recorded params and code: nothing reruns for the copy
    shutil.copytree(work, ref, symlinks=True, ignore=shutil.ignore_patterns("locks", "report.html"))
    before = {f: (ref / f).stat().st_mtime_ns for f in REUSED}
    configs = (ref / path.name, ROOT / ".test/config-reference/config.yaml")
    if cluster is None:
        res = snakemake(ref, configs, *REFERENCE_TARGETS)
        assert res.returncode == 0, res.stderr[-5000:]
        return ref, before, None
    res = snakemake_slurm(cluster, ref, configs, *REFERENCE_TARGETS)
    assert res.returncode == 0, res.stderr[-8000:] + cluster.log("slurmctld")[-3000:]
    rules = {re.match(r"rule_([a-z_]+?)(?:_wildcards_|$)", j["Comment"]).group(1)
             for j in cluster.jobs() if j.get("WorkDir") == str(ref)}
    return ref, before, rules


def test_the_reference_protocol_runs_beside_the_project_s(run, reference_run, tmp_path):
    """docs/fidelity.md's switches through the DAG: each benchmark its own direction and local sets,
    the nested LA-IG, pinned category clamps and the reference gate, with the organism, activations
    and SAEs reused; the results page then sets the two benchmark tables side by side."""
    from refusal_atlas.reporting import results_page

    work, _, _ = run
    ref, before, rules = reference_run
    assert {f: (ref / f).stat().st_mtime_ns for f in REUSED} == before
    if rules is not None:
        assert {"feature_attribution", "steer_generate", "category_steering", "guardrail_eval", "submodule_corpus",
                "submodule_sae", "circuits"} <= rules, rules
        assert not rules & {"prepare_model", "refusal_tune", "cache_activations", "train_sae", "refusal_direction"}
    fits = {p: json.loads((ref / f"results/features/tiny/{p}/attribution.transductive.json").read_text())
            for p in ("bundled", "refusal_direction")}
    for p, fit in fits.items():
        assert fit["la_ig"]["path"] == "nested" and fit["la_ig"]["positions"] == "after_header", p
        assert fit["la_ig"]["patch_error"] == "pre_ablation", p
    directions = [load_file(ref / f"results/features/tiny/{p}/attribution.transductive.safetensors")["direction"]
                  for p in fits]
    assert not np.allclose(directions[0].numpy(), directions[1].numpy())
    table = pd.read_csv(ref / "results/tables/benchmark.csv")
    local = table[table.method == "la_ig-local-transductive"]
    assert set(local.promptset) == {"bundled", "refusal_direction"} and (local.n > 0).all()
    assert set(table.judge) == {"substring"}
    assert _last_params(ref, "category_steering")["cfg"]["pin_other_set"] is True
    assert _last_params(work, "category_steering")["cfg"]["pin_other_set"] is False
    assert _last_params(ref, "guardrail_eval")["cfg"]["gate_edit"] == "all_selected"
    # Marks et al.'s graph: nodes at each SAE layer's attention and MLP outputs, trained SAEs there
    with safe_open(ref / "results/categories/tiny/circuit_scores.safetensors", "pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["layers"]) == ["attn1", "mlp1", "1", "attn3", "mlp3", "3"]
    assert ["1", "attn3"] in json.loads(meta["pairs"]) and ["attn1", "3"] not in json.loads(meta["pairs"])
    assert json.loads((ref / "results/saes/tiny/attn_3/cfg.json").read_text())["metadata"]["hook_name"] == (
        "blocks.3.hook_attn_out")
    graphs = list((ref / "results/categories/tiny/circuits").rglob("*.graphml"))
    assert graphs and any(".mlp/" in line or ".attn/" in line for g in graphs for line in g.read_text().splitlines())
    page = results_page.build(work, tmp_path / "results.md", ROOT, beside=ref)
    beside = page.split(f"## Beside `{ref.name}`", 1)[1]
    assert "la_ig-local-transductive" in beside and "refusal_direction" in beside
