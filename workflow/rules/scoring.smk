# Scoring: judge every generation, then rates with n and bootstrap intervals.


rule judge:
    input:
        "results/generations/{model}/{promptset}/{method}.parquet",
    output:
        "results/scores/{model}/{promptset}/{method}.{judge}.parquet",
    params:
        substrings=config["judges"]["substring"]["substrings"],
    log:
        "logs/judge/{model}/{promptset}/{method}.{judge}.log",
    benchmark:
        "benchmarks/judge/{model}/{promptset}/{method}.{judge}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/core.yaml"
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
    params:
        boot=config["bootstrap"],
    log:
        "logs/summarize_scores/{model}.log",
    benchmark:
        "benchmarks/summarize_scores/{model}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/core.yaml"
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
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/core.yaml"
    script:
        "../scripts/baselines_table.py"
