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
        code=library_code("prepare_model"),
        spec=lambda w: model_params(w.model),
    script:
        "../scripts/prepare_model.py"


rule base_refusal:
    input:
        base="results/models/{model}/base",
        promptsets=organism_promptset_files("eval_promptsets"),
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
        code=library_code("base_refusal"),
        spec=lambda w: load_params(w.model),
        organism=organism_eval_params(),
        sources=organism_eval_sources(),
        substrings=config["judges"]["substring"]["substrings"],
        boot=config["bootstrap"],
    script:
        "../scripts/base_refusal.py"


rule refusal_tune:
    input:
        base="results/models/{model}/base",
        promptsets=organism_promptset_files("train_promptsets"),
    output:
        directory("results/models/{model}/tuned"),
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
        code=library_code("refusal_tune"),
        spec=lambda w: load_params(w.model),
        organism=organism_train_params(),
    script:
        "../scripts/refusal_tune.py"


# The card evaluates the saved organism: judging and statistics keys rerun this, never training.
rule organism_card:
    input:
        base="results/models/{model}/base",
        tuned="results/models/{model}/tuned",
        base_rates="results/models/{model}/base_refusal.json",
        promptsets=organism_promptset_files("eval_promptsets"),
    output:
        "results/models/{model}/model_card.json",
    log:
        "logs/organism_card/{model}.log",
    benchmark:
        "benchmarks/organism_card/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=60,
        gpu=gpus("organism_card"),
    params:
        code=library_code("organism_card"),
        spec=lambda w: load_params(w.model),
        organism=organism_eval_params(targets=True),
        sources=organism_eval_sources(),
        substrings=config["judges"]["substring"]["substrings"],
        boot=config["bootstrap"],
    script:
        "../scripts/organism_card.py"
