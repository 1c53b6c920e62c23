# Dynamic SAE guardrails (Muhamed et al. 2025): gated unlearning, and a refusal guardrail.


rule guardrail_select:
    input:
        model=final_model_dir,
        saes=gate_sae_dirs,
        forget=lambda w: repo_path(config["guardrails"]["unlearning"]["forget"]),
        retain=lambda w: repo_path(config["guardrails"]["unlearning"]["retain"]),
    output:
        selection="results/guardrails/{model}/unlearning_selection.parquet",
        stats="results/guardrails/{model}/unlearning_stats.parquet",
    log:
        "logs/guardrail_select/{model}.log",
    benchmark:
        "benchmarks/guardrail_select/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=60,
        gpu=gpus("guardrail_select"),
    params:
        code=library_code("guardrail_select"),
        # raw text chunks, no chat turns
        spec=lambda w: load_params(w.model, chat=False),
        cfg=without(
            config["guardrails"]["unlearning"],
            "c_values",
            "gate_edit",
            "multiple_choice",
            "retain_min",
        ),
    script:
        "../scripts/guardrail_select.py"


rule guardrail_eval:
    input:
        unpack(guardrail_mc_inputs),
        model=final_model_dir,
        saes=gate_sae_dirs,
        forget=lambda w: repo_path(config["guardrails"]["unlearning"]["forget"]),
        retain=lambda w: repo_path(config["guardrails"]["unlearning"]["retain"]),
        selection="results/guardrails/{model}/unlearning_selection.parquet",
    output:
        table="results/guardrails/{model}/unlearning.csv",
        table_html=report(
            "results/guardrails/{model}/unlearning.html",
            caption="../report/unlearning.rst",
            category="Guardrails",
            subcategory="{model}",
        ),
        score="results/guardrails/{model}/unlearning_score.json",
        png=report(
            "results/guardrails/{model}/unlearning.png",
            caption="../report/unlearning.rst",
            category="Guardrails",
            subcategory="{model}",
        ),
        svg=report(
            "results/guardrails/{model}/unlearning.svg",
            caption="../report/unlearning.rst",
            category="Guardrails",
            subcategory="{model}",
        ),
    log:
        "logs/guardrail_eval/{model}.log",
    benchmark:
        "benchmarks/guardrail_eval/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=120,
        gpu=gpus("guardrail_eval"),
    params:
        code=library_code("guardrail_eval"),
        spec=lambda w: load_params(w.model),
        # the selection (an input) carries q, n and tau
        cfg=without(
            config["guardrails"]["unlearning"], "n_values", "q_values", "tau_quantile"
        ),
        boot=config["bootstrap"],
        caption=lambda w: (
            f"{w.model}: forget/retain passages "
            f"({config['guardrails']['unlearning']['forget']} / "
            f"{config['guardrails']['unlearning']['retain']}), next-token accuracy "
            "relative to the unmodified model; 95% paired bootstrap CIs"
        ),
    script:
        "../scripts/guardrail_eval.py"


rule refusal_guardrail:
    input:
        unpack(refusal_guardrail_inputs),
    output:
        table="results/guardrails/{model}/refusal_{weights}.csv",
        table_html=report(
            "results/guardrails/{model}/refusal_{weights}.html",
            caption="../report/refusal_guardrail.rst",
            category="Guardrails",
            subcategory="{model}",
        ),
        generations="results/guardrails/{model}/refusal_{weights}.parquet",
        png=report(
            "results/guardrails/{model}/refusal_{weights}.png",
            caption="../report/refusal_guardrail.rst",
            category="Guardrails",
            subcategory="{model}",
        ),
        svg=report(
            "results/guardrails/{model}/refusal_{weights}.svg",
            caption="../report/refusal_guardrail.rst",
            category="Guardrails",
            subcategory="{model}",
        ),
    log:
        "logs/refusal_guardrail/{model}.{weights}.log",
    benchmark:
        "benchmarks/refusal_guardrail/{model}.{weights}.tsv"
    wildcard_constraints:
        weights="tuned|base",
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=120,
        gpu=gpus("refusal_guardrail"),
    params:
        code=library_code("refusal_guardrail"),
        spec=lambda w: load_params(w.model),
        cfg=lambda w: without(refusal_guardrail_params(w.model, w.weights), "selector"),
        substrings=config["judges"]["substring"]["substrings"],
        boot=config["bootstrap"],
        caption=lambda w: refusal_guardrail_caption(w.model, w.weights),
    script:
        "../scripts/refusal_guardrail.py"
