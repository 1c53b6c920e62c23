# Steered generation: greedy, batched, KV-cached, under a condition ({method}), in shards.


rule steering_search:
    input:
        unpack(fourlabel_inputs("steering_search")),
        model=final_model_dir,
        promptset=lambda w: f"results/promptsets/{feature_promptset(config)}.parquet",
        features=lambda w: f"results/features/{w.model}/{feature_promptset(config)}/la_ig.parquet",
        saes=lambda w: [
            f"results/saes/{w.model}/layer_{l}" for l in sae_layers(w.model)
        ],
    output:
        hparams="results/steering/{model}/hparams.json",
        sweep="results/steering/{model}/sweep.csv",
        sweep_html=report(
            "results/steering/{model}/sweep.html",
            caption="../report/steering_search.rst",
            category="Steering",
            subcategory="{model}",
        ),
    log:
        "logs/steering_search/{model}.log",
    benchmark:
        "benchmarks/steering_search/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=240,
        gpu=gpus("steering_search"),
    params:
        code=library_code("steering_search"),
        spec=lambda w: load_params(w.model),
        cfg=lambda w: model_section(w.model, "steering")["search"],
        substrings=config["judges"]["substring"]["substrings"],
        boot=config["bootstrap"],
    script:
        "../scripts/steering_search.py"


rule steer_generate:
    input:
        unpack(steer_inputs),
    output:
        "results/generations/{model}/{promptset}/{method}/shard-{shard}.parquet",
    log:
        "logs/steer_generate/{model}/{promptset}/{method}/shard-{shard}.log",
    benchmark:
        "benchmarks/steer_generate/{model}/{promptset}/{method}/shard-{shard}.tsv"
    conda:
        "../envs/core.yaml"
    # Greedy decoding of a small model is bound by per-step overhead: on CPU, two one-thread jobs
    # side by side do more work than one job on two threads (docs/architecture.md, "Run time").
    threads: 1
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=120,
        gpu=gpus("steer_generate"),
    params:
        code=library_code("steer_generate"),
        spec=lambda w: load_params(w.model),
        splits=config["evaluation"]["splits"],
        variants=config["evaluation"]["variants"],
        n_shards=config["evaluation"]["shards"],
        max_new_tokens=config["evaluation"]["max_new_tokens"],
        batch_size=config["evaluation"]["batch_size"],
        steering=steering_params,
    script:
        "../scripts/steer_generate.py"


rule gather_generations:
    input:
        lambda w: expand(
            "results/generations/{model}/{promptset}/{method}/shard-{shard}.parquet",
            model=w.model,
            promptset=w.promptset,
            method=w.method,
            shard=range(config["evaluation"]["shards"]),
        ),
    output:
        "results/generations/{model}/{promptset}/{method}.parquet",
    log:
        "logs/gather_generations/{model}/{promptset}/{method}.log",
    benchmark:
        "benchmarks/gather_generations/{model}/{promptset}/{method}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=library_code("gather_generations"),
    script:
        "../scripts/gather_generations.py"
