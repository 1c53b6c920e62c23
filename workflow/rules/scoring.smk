# Scoring: judge every generation, then rates with n and bootstrap intervals.


rule judge:
    input:
        "results/generations/{model}/{promptset}/{method}.parquet",
    output:
        "results/scores/{model}/{promptset}/{method}.{judge}.parquet",
    log:
        "logs/judge/{model}/{promptset}/{method}.{judge}.log",
    benchmark:
        "benchmarks/judge/{model}/{promptset}/{method}.{judge}.tsv"
    wildcard_constraints:
        judge="substring",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=library_code("judge"),
        substrings=config["judges"]["substring"]["substrings"],
    script:
        "../scripts/judge.py"


rule judge_preflight:
    output:
        "results/judges/harmbench.preflight.json",
    log:
        "logs/judge_preflight/harmbench.log",
    benchmark:
        "benchmarks/judge_preflight/harmbench.tsv"
    conda:
        "../envs/vllm.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
        gpu=lambda w: harmbench_gpus(),
    params:
        code=library_code("judge_preflight"),
        cfg=config["judges"]["harmbench"],
    script:
        "../scripts/judge_preflight.py"


rule judge_harmbench:
    input:
        unpack(harmbench_inputs),
        gens="results/generations/{model}/{promptset}/{method}.parquet",
        ok="results/judges/harmbench.preflight.json",
    output:
        "results/scores/{model}/{promptset}/{method}.{judge}.parquet",
    log:
        "logs/judge_harmbench/{model}/{promptset}/{method}.{judge}.log",
    benchmark:
        "benchmarks/judge_harmbench/{model}/{promptset}/{method}.{judge}.tsv"
    wildcard_constraints:
        judge="harmbench",
    conda:
        "../envs/vllm.yaml"
    threads: 4
    resources:
        mem_mb=config["judges"]["harmbench"]["mem_mb"],
        runtime=60,
        gpu=lambda w: harmbench_gpus(),
    params:
        code=library_code("judge_harmbench"),
        cfg=config["judges"]["harmbench"],
    script:
        "../scripts/judge_harmbench.py"


rule summarize_scores:
    input:
        unpack(summary_inputs),
    output:
        table="results/scores/{model}/summary.csv",
        html=report(
            "results/scores/{model}/summary.html",
            caption="../report/summary.rst",
            category="Baselines",
            subcategory="{model}",
        ),
    log:
        "logs/summarize_scores/{model}.log",
    benchmark:
        "benchmarks/summarize_scores/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=library_code("summarize_scores"),
        boot=config["bootstrap"],
    script:
        "../scripts/summarize_scores.py"


rule baselines_table:
    input:
        expand("results/scores/{model}/summary.csv", model=config["models"]),
    output:
        table="results/tables/baselines.csv",
        html=report(
            "results/tables/baselines.html",
            caption="../report/baselines.rst",
            category="Baselines",
            subcategory="All models",
        ),
    log:
        "logs/baselines_table.log",
    benchmark:
        "benchmarks/baselines_table.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=library_code("baselines_table"),
    script:
        "../scripts/baselines_table.py"


rule benchmark_table:
    input:
        expand("results/scores/{model}/summary.csv", model=config["models"]),
    output:
        table="results/tables/benchmark.csv",
        table_html=report(
            "results/tables/benchmark.html",
            caption="../report/benchmark.rst",
            category="Steering",
            subcategory="All models",
        ),
        png=report(
            "results/figures/benchmark.png",
            caption="../report/benchmark.rst",
            category="Steering",
            subcategory="All models",
        ),
        svg=report(
            "results/figures/benchmark.svg",
            caption="../report/benchmark.rst",
            category="Steering",
            subcategory="All models",
        ),
    log:
        "logs/benchmark_table.log",
    benchmark:
        "benchmarks/benchmark_table.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=library_code("benchmark_table"),
        judges=config["evaluation"]["judges"],
        judge_names={
            "substring": "refusal substrings, jailbreak = no refusal",
            "harmbench": config["judges"]["harmbench"]["model"],
        },
    script:
        "../scripts/benchmark_table.py"


rule induction_table:
    input:
        expand("results/scores/{model}/summary.csv", model=config["models"]),
    output:
        table="results/tables/induction.csv",
        table_html=report(
            "results/tables/induction.html",
            caption="../report/induction.rst",
            category="Steering",
            subcategory="All models",
        ),
        png=report(
            "results/figures/induction.png",
            caption="../report/induction.rst",
            category="Steering",
            subcategory="All models",
        ),
        svg=report(
            "results/figures/induction.svg",
            caption="../report/induction.rst",
            category="Steering",
            subcategory="All models",
        ),
    log:
        "logs/induction_table.log",
    benchmark:
        "benchmarks/induction_table.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=library_code("induction_table"),
    script:
        "../scripts/induction_table.py"
