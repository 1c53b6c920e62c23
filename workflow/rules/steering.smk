# Steered generation: greedy, batched, KV-cached, under an intervention ({method}).


rule steer_generate:
    input:
        unpack(steer_inputs),
    output:
        "results/generations/{model}/{promptset}/{method}.parquet",
    log:
        "logs/steer_generate/{model}/{promptset}/{method}.log",
    benchmark:
        "benchmarks/steer_generate/{model}/{promptset}/{method}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=120,
    params:
        spec=lambda w: model_params(w.model),
        splits=config["evaluation"]["splits"],
        max_new_tokens=config["evaluation"]["max_new_tokens"],
        batch_size=config["evaluation"]["batch_size"],
    script:
        "../scripts/steer_generate.py"
