# The refusal direction: difference in means on every layer, and the choice of l*.


rule refusal_direction:
    input:
        model=final_model_dir,
        acts=f"results/activations/{{model}}/{config['direction']['promptset']}.safetensors",
        index=f"results/activations/{{model}}/{config['direction']['promptset']}.index.parquet",
    output:
        directions="results/directions/{model}.safetensors",
        layers="results/directions/{model}.layers.parquet",
        summary="results/directions/{model}.json",
    log:
        "logs/refusal_direction/{model}.log",
    benchmark:
        "benchmarks/refusal_direction/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=60,
        gpu=gpus("refusal_direction"),
    params:
        code=library_code("refusal_direction"),
        spec=lambda w: load_params(w.model),
        cfg=lambda w: without(model_section(w.model, "direction"), "promptset"),
        substrings=config["judges"]["substring"]["substrings"],
    script:
        "../scripts/refusal_direction.py"
