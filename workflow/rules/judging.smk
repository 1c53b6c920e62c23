# The four-label judge: calibrated on hand labels, then run on any condition's generations.


rule judge_calibration:
    input:
        labelled=fourlabel_labelled(),
        base=f"results/models/{fourlabel_reference()}/base",
    output:
        judge="results/judges/fourlabel.json",
        agreement=report(
            "results/judges/agreement.html",
            caption="../report/judge_agreement.rst",
            category="Judges",
        ),
        agreement_csv="results/judges/agreement.csv",
        per_condition=report(
            "results/judges/per_condition.html",
            caption="../report/judge_agreement.rst",
            category="Judges",
        ),
        per_condition_csv="results/judges/per_condition.csv",
        confusion=report(
            "results/judges/confusion.html",
            caption="../report/judge_agreement.rst",
            category="Judges",
        ),
        confusion_csv="results/judges/confusion.csv",
        rows="results/judges/labelled_signals.parquet",
    log:
        "logs/judge_calibration/fourlabel.log",
    benchmark:
        "benchmarks/judge_calibration/fourlabel.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        code=library_code("judge_calibration"),
        substrings=config["judges"]["substring"]["substrings"],
        batch_size=config["judges"]["fourlabel"]["batch_size"],
    script:
        "../scripts/judge_calibration.py"


rule judge_fourlabel:
    input:
        gens="results/generations/{model}/{promptset}/{method}.parquet",
        judge="results/judges/fourlabel.json",
        base=f"results/models/{fourlabel_reference()}/base",
    output:
        "results/scores/{model}/{promptset}/{method}.{judge}.parquet",
    log:
        "logs/judge_fourlabel/{model}/{promptset}/{method}.{judge}.log",
    benchmark:
        "benchmarks/judge_fourlabel/{model}/{promptset}/{method}.{judge}.tsv"
    wildcard_constraints:
        judge="fourlabel",
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        code=library_code("judge_fourlabel"),
        batch_size=config["judges"]["fourlabel"]["batch_size"],
    script:
        "../scripts/judge_fourlabel.py"
