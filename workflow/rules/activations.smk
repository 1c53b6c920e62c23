# Activations: last-prompt-token resid_post on every layer.


rule cache_activations:
    input:
        model=final_model_dir,
        promptset="results/promptsets/{promptset}.parquet",
    output:
        acts="results/activations/{model}/{promptset}.safetensors",
        index="results/activations/{model}/{promptset}.index.parquet",
    log:
        "logs/cache_activations/{model}/{promptset}.log",
    benchmark:
        "benchmarks/cache_activations/{model}/{promptset}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=60,
        gpu=gpus("cache_activations"),
    params:
        code=library_code("cache_activations"),
        spec=lambda w: load_params(w.model),
        batch_size=config["activations"]["batch_size"],
    script:
        "../scripts/cache_activations.py"
