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
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        substrings=config["judges"]["substring"]["substrings"],
    script:
        "../scripts/judge.py"


rule summarize_scores:
    input:
        lambda w: score_files(w.model),
    output:
        report(
            "results/scores/{model}/summary.csv",
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
        boot=config["bootstrap"],
    script:
        "../scripts/summarize_scores.py"


rule baselines_table:
    input:
        expand("results/scores/{model}/summary.csv", model=config["models"]),
    output:
        report(
            "results/tables/baselines.csv",
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
    script:
        "../scripts/baselines_table.py"
