"""GPU requests per rule and model (refusal_atlas.cluster.gpus), per-model config overrides and the
SLURM allocation line of every job's log."""

import copy

import pytest

from refusal_atlas.cluster.gpus import GPU_STAGES, stage_gpus, stage_memory
from refusal_atlas.cluster.memory import GEMMA_2_2B, la_ig_memory
from refusal_atlas.config.sections import for_model
from refusal_atlas.pipeline.job import slurm_allocation

GEMMA = {"n_params": GEMMA_2_2B.n_params, "n_layers": 26, "d_model": 2304, "d_mlp": 9216, "n_heads": 8, "vocab": 256000}
LLAMA_8B = {"n_params": 8030261248, "n_layers": 32, "d_model": 4096, "d_mlp": 14336, "n_heads": 32, "vocab": 128256}


def spec(shape, d_sae, n_layers, **kw):
    return {"dtype": "bfloat16", "device": "cuda", "gpus": None, "shape": shape,
            "sae": {"d_sae": d_sae, "layers": list(range(n_layers)), "train_batch_size": 4096}, **kw}


def cfg(la_bz=5, seq_len=256):
    return {"cluster": {"gpu_mem_gb": 80, "usable_fraction": 0.9, "seq_len": seq_len}, "features": {"la_bz": la_bz},
            "organism": {"train_from_layer": 0, "batch_size": 16},
            "evaluation": {"batch_size": 32, "judges": ["substring"]},
            "judges": {"harmbench": {"stages": [], "n_params": 13015864320}},
            "probes": {"batch_size": 32},
            "guardrails": {"unlearning": {"batch_size": 16, "max_tokens": 128}, "refusal": {"batch_size": 32}},
            "dashboards": {"batch_size": 16},
            "categories": {"la_bz": None, "batch_size": 32, "circuits": {"batch_size": 8, "submodules": ["resid"]}}}


def test_gemma_with_gemma_scope_fits_one_gpu_per_rule():
    s = spec(GEMMA, 65536, 26)
    assert {st: stage_gpus(st, s, cfg()) for st in GPU_STAGES} == dict.fromkeys(GPU_STAGES, 1)


def test_circuits_over_marks_et_al_s_submodules_count_three_saes_a_layer():
    s, plain = spec(GEMMA, 65536, 26), cfg()
    marks = copy.deepcopy(plain)
    marks["categories"]["circuits"]["submodules"] = ["attn", "mlp", "resid"]
    want = la_ig_memory(GEMMA_2_2B, d_sae=65536, n_sae_layers=3 * 26, la_bz=8, seq_len=256, dtype_bytes=2)["peak"]
    assert stage_memory("circuits", s, marks) == want > stage_memory("circuits", s, plain)


def test_the_category_job_counts_the_classifier_it_judges_with():
    s, plain = spec(LLAMA_8B, 32768, 32), cfg()
    judged = copy.deepcopy(plain)
    judged["evaluation"]["judges"].append("harmbench")
    assert stage_memory("category_steering", s, judged) == stage_memory("category_steering", s, plain)
    judged["judges"]["harmbench"]["stages"] = ["category_steering"]
    assert stage_memory("category_steering", s, judged) == stage_memory("category_steering", s, plain) + 2 * 13015864320
    assert stage_memory("steer_generate", s, judged) == stage_memory("steer_generate", s, plain)


def test_la_ig_through_32_llama_scope_saes_of_an_8b_model_asks_for_two_gpus_at_la_bz_10():
    s = spec(LLAMA_8B, 32768, 32)
    assert stage_gpus("feature_attribution", s, cfg(la_bz=5)) == 1
    assert stage_gpus("feature_attribution", s, cfg(la_bz=10)) == 2
    assert stage_gpus("steer_generate", s, cfg(la_bz=10)) == 1
    # full fine-tuning keeps fp32 AdamW state of 8B parameters: more than one 80 GB GPU
    assert stage_gpus("refusal_tune", s, cfg()) == 2


def test_the_la_ig_estimate_is_the_memory_model_and_grows_with_the_batch():
    s = spec(GEMMA, 65536, 26)
    shape = GEMMA_2_2B
    want = la_ig_memory(shape, d_sae=65536, n_sae_layers=26, la_bz=5, seq_len=256, dtype_bytes=2)["peak"]
    assert stage_memory("feature_attribution", s, cfg()) == want
    sizes = [stage_memory("feature_attribution", s, cfg(la_bz=b)) for b in (1, 5, 10)]
    assert sizes == sorted(sizes) and sizes[0] > GEMMA_2_2B.n_params * 2
    # more GPU memory per card, fewer cards
    big = {**cfg(la_bz=10), "cluster": {"gpu_mem_gb": 141, "usable_fraction": 0.9, "seq_len": 256}}
    assert stage_gpus("feature_attribution", spec(LLAMA_8B, 32768, 32), big) == 1


def test_cpu_models_explicit_counts_missing_shapes_and_cpu_rules():
    s = spec(GEMMA, 65536, 26)
    assert stage_gpus("steer_generate", {**s, "device": "cpu"}, cfg()) == 0
    assert stage_gpus("steer_generate", {**s, "gpus": 3}, cfg()) == 3
    # the scheduler may be asked for a GPU the job will not use (the SLURM test does this)
    assert stage_gpus("steer_generate", {**s, "device": "cpu", "gpus": 1}, cfg()) == 1
    assert stage_gpus("steer_generate", {**s, "shape": None}, cfg()) == 1
    assert stage_gpus("select_features", s, cfg()) == 0 and stage_gpus("select_features", {**s, "gpus": 2}, cfg()) == 0
    with pytest.raises(ValueError, match="not a GPU stage"):
        stage_memory("select_features", s, cfg())


def test_model_overrides_merge_key_by_key_without_touching_the_base_config():
    base = {
        "models": {"a": {"overrides": {"direction": {"layer": 15}, "steering": {"search": {"c_values": [-3]}}}},
                   "b": {"overrides": {}}},
        "direction": {"layer": None, "kl_max": 2.0},
        "steering": {"c": None, "search": {"c_values": [-1, -2], "k_values": [5]}},
        "features": {"la_bz": 5},
    }
    before = copy.deepcopy(base)
    a = for_model(base, "a")
    assert a["direction"] == {"layer": 15, "kl_max": 2.0}
    assert a["steering"]["search"] == {"c_values": [-3], "k_values": [5]} and a["steering"]["c"] is None
    assert for_model(base, "b")["direction"] == base["direction"]
    assert base == before


def test_slurm_allocation_line():
    env = {"SLURM_JOB_ID": "7", "SLURMD_NODENAME": "gpu01", "SLURM_CPUS_PER_TASK": "4", "SLURM_JOB_GPUS": "2,3",
           "CUDA_VISIBLE_DEVICES": "0,1"}
    assert slurm_allocation(env) == "slurm job 7 on gpu01: 4 cpus, 2 gpus [2,3], CUDA_VISIBLE_DEVICES=0,1"
    assert "0 gpus []" in slurm_allocation({"SLURM_JOB_ID": "8"})
