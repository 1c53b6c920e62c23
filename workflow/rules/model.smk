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
        spec=lambda w: model_params(w.model),
    script:
        "../scripts/prepare_model.py"


rule base_refusal:
    input:
        base="results/models/{model}/base",
        promptsets=organism_promptset_files(),
    output:
        "results/models/{model}/base_refusal.json",
    log:
        "logs/base_refusal/{model}.log",
    benchmark:
        "benchmarks/base_refusal/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=60,
        gpu=gpus("base_refusal"),
    params:
        spec=lambda w: model_params(w.model),
        organism=organism_eval_params(),
        substrings=config["judges"]["substring"]["substrings"],
        boot=config["bootstrap"],
    script:
        "../scripts/base_refusal.py"


rule refusal_tune:
    input:
        base="results/models/{model}/base",
        base_rates="results/models/{model}/base_refusal.json",
        promptsets=organism_promptset_files(),
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
        gpu=gpus("refusal_tune"),
    params:
        spec=lambda w: model_params(w.model),
        organism=config["organism"],
        substrings=config["judges"]["substring"]["substrings"],
        boot=config["bootstrap"],
    script:
        "../scripts/refusal_tune.py"
