# Models: a local HF directory from any source, and the refusal model organism.


rule prepare_model:
    output:
        directory("results/models/{model}/base"),
    log:
        "logs/prepare_model/{model}.log",
    benchmark:
        "benchmarks/prepare_model/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=60,
    params:
        spec=lambda w: model_spec(w.model),
    script:
        "../scripts/prepare_model.py"


rule refusal_tune:
    input:
        base="results/models/{model}/base",
        promptsets=expand(
            "results/promptsets/{p}.parquet",
            p=sorted(
                set(config["organism"]["train_promptsets"])
                | set(config["organism"]["eval_promptsets"])
            ),
        ),
    output:
        model=directory("results/models/{model}/tuned"),
        card="results/models/{model}/model_card.json",
    log:
        "logs/refusal_tune/{model}.log",
    benchmark:
        "benchmarks/refusal_tune/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: 2 * model_spec(w.model)["mem_mb"],
        runtime=120,
    params:
        spec=lambda w: model_spec(w.model),
        organism=config["organism"],
        substrings=config["judges"]["substring"]["substrings"],
        boot=config["bootstrap"],
    script:
        "../scripts/refusal_tune.py"
