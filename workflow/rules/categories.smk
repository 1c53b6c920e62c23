# Harm categories: per-category refusal features and their clamps (Yeo et al. 2025 §4.2), sparse
# feature circuits per category (Marks et al. 2024), and a permutation test of modularity.


rule category_features:
    input:
        unpack(category_inputs),
    output:
        features="results/categories/{model}/features.parquet",
        conditions="results/categories/{model}/conditions.parquet",
        summary="results/categories/{model}/features.json",
        table="results/categories/{model}/features.csv",
        html=report(
            "results/categories/{model}/features.html",
            caption="../report/category_features.rst",
            category="Harm categories",
            subcategory="{model}",
        ),
    log:
        "logs/category_features/{model}.log",
    benchmark:
        "benchmarks/category_features/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: 2 * model_spec(w.model)["mem_mb"],
        runtime=240,
        gpu=gpus("category_features"),
    params:
        code=library_code("category_features"),
        spec=lambda w: load_params(w.model),
        cfg=lambda w: without(
            category_params(w.model),
            "c_by_condition",
            "circuits",
            "clamp",
            "eval_max_prompts",
            "eval_split",
            "max_new_tokens",
            "pin_other_set",
            "test",
        ),
    script:
        "../scripts/category_features.py"


rule category_steering:
    input:
        unpack(category_steering_inputs),
    output:
        rates="results/categories/{model}/steering.parquet",
        table="results/categories/{model}/normalized_jailbreak.csv",
        html=report(
            "results/categories/{model}/normalized_jailbreak.html",
            caption="../report/category_steering.rst",
            category="Harm categories",
            subcategory="{model}",
        ),
        summary="results/categories/{model}/normalized_jailbreak_summary.csv",
        summary_html=report(
            "results/categories/{model}/normalized_jailbreak_summary.html",
            caption="../report/category_steering.rst",
            category="Harm categories",
            subcategory="{model}",
        ),
        png=report(
            "results/categories/{model}/normalized_jailbreak.png",
            caption="../report/category_steering.rst",
            category="Harm categories",
            subcategory="{model}",
        ),
        svg=report(
            "results/categories/{model}/normalized_jailbreak.svg",
            caption="../report/category_steering.rst",
            category="Harm categories",
            subcategory="{model}",
        ),
    log:
        "logs/category_steering/{model}.log",
    benchmark:
        "benchmarks/category_steering/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=240,
        gpu=gpus("category_steering"),
    params:
        code=library_code("category_steering"),
        spec=lambda w: load_params(w.model),
        cfg=lambda w: without(
            category_params(w.model),
            "categories",
            "circuits",
            "common_min_fraction",
            "fit_split",
            "harmless",
            *LA_IG_KEYS,
            "k0",
            "k_star",
            "max_prompts",
            "min_prompts",
            "test",
            "truncate_specific",
        ),
        substrings=config["judges"]["substring"]["substrings"],
        harmbench=(
            config["judges"]["harmbench"]
            if harmbench_stage("category_steering")
            else None
        ),
        boot=config["bootstrap"],
        caption=lambda w: category_caption(
            w.model,
            "normalized jailbreak per clamp condition; jailbreak: "
            f"{stage_judge_words('category_steering', 'compliance')} "
            f"({config['categories']['max_new_tokens']} greedy tokens); 95% bootstrap CIs",
        ),
    script:
        "../scripts/category_steering.py"


rule circuits:
    input:
        unpack(circuit_inputs),
    output:
        scores="results/categories/{model}/circuit_scores.safetensors",
        index="results/categories/{model}/circuit_prompts.parquet",
        graphs=directory("results/categories/{model}/circuits"),
        faithfulness="results/categories/{model}/faithfulness.csv",
        faithfulness_html=report(
            "results/categories/{model}/faithfulness.html",
            caption="../report/faithfulness.rst",
            category="Harm categories",
            subcategory="{model}",
        ),
        png=report(
            "results/categories/{model}/faithfulness.png",
            caption="../report/faithfulness.rst",
            category="Harm categories",
            subcategory="{model}",
        ),
        svg=report(
            "results/categories/{model}/faithfulness.svg",
            caption="../report/faithfulness.rst",
            category="Harm categories",
            subcategory="{model}",
        ),
    log:
        "logs/circuits/{model}.log",
    benchmark:
        "benchmarks/circuits/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: 2 * model_spec(w.model)["mem_mb"],
        runtime=480,
        gpu=gpus("circuits"),
    params:
        code=library_code("circuits"),
        spec=lambda w: load_params(w.model),
        cfg=lambda w: without(
            category_params(w.model),
            "c_by_condition",
            "clamp",
            "common_min_fraction",
            *LA_IG_KEYS,
            "k0",
            "k_star",
            "max_new_tokens",
            "test",
            "pin_other_set",
            "truncate_specific",
        ),
        caption=lambda w: category_caption(
            w.model,
            "faithfulness and completeness of category circuits (mean ablation, "
            + (
                "errors kept"
                if config["categories"]["circuits"]["error_nodes"] == "keep"
                else "error nodes ablated unless in the circuit"
            )
            + "; metric: refusal log-odds at the last prompt token)",
            circuit_promptset(config),
        ),
    script:
        "../scripts/circuits.py"


rule modularity:
    input:
        scores="results/categories/{model}/circuit_scores.safetensors",
        index="results/categories/{model}/circuit_prompts.parquet",
        steering="results/categories/{model}/normalized_jailbreak_summary.csv",
    output:
        similarity="results/categories/{model}/similarity.csv",
        similarity_html=report(
            "results/categories/{model}/similarity.html",
            caption="../report/modularity.rst",
            category="Harm categories",
            subcategory="{model}",
        ),
        tests="results/categories/{model}/modularity_tests.csv",
        tests_html=report(
            "results/categories/{model}/modularity_tests.html",
            caption="../report/modularity.rst",
            category="Harm categories",
            subcategory="{model}",
        ),
        pairwise="results/categories/{model}/pairwise_tests.csv",
        pairwise_html=report(
            "results/categories/{model}/pairwise_tests.html",
            caption="../report/modularity.rst",
            category="Harm categories",
            subcategory="{model}",
        ),
        verdict="results/categories/{model}/verdict.json",
        verdict_html=report(
            "results/categories/{model}/verdict.html",
            caption="../report/verdict.rst",
            category="Harm categories",
            subcategory="{model}",
        ),
        png=report(
            "results/categories/{model}/similarity.png",
            caption="../report/modularity.rst",
            category="Harm categories",
            subcategory="{model}",
        ),
        svg=report(
            "results/categories/{model}/similarity.svg",
            caption="../report/modularity.rst",
            category="Harm categories",
            subcategory="{model}",
        ),
    log:
        "logs/modularity/{model}.log",
    benchmark:
        "benchmarks/modularity/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        code=library_code("modularity"),
        cfg=lambda w: without(
            category_params(w.model),
            "c_by_condition",
            "clamp",
            "common_min_fraction",
            *LA_IG_KEYS,
            "k0",
            "k_star",
            "max_new_tokens",
            "pin_other_set",
            "truncate_specific",
        ),
        caption=lambda w: category_caption(
            w.model,
            "similarity of category circuits (toxic: plain harmful prompts; safe: harmless "
            f"{config['categories']['circuits']['safe_variant']}s)",
            circuit_promptset(config),
        ),
    script:
        "../scripts/modularity.py"
