# Capabilities under each condition: CE on the model's own harmless answers and on generic text.


rule capabilities:
    input:
        unpack(capabilities_inputs),
    output:
        "results/capabilities/{model}/{method}.json",
    log:
        "logs/capabilities/{model}/{method}.log",
    benchmark:
        "benchmarks/capabilities/{model}/{method}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=60,
        gpu=gpus("capabilities"),
    params:
        code=library_code("capabilities"),
        spec=lambda w: load_params(w.model),
        cfg=without(config["capabilities"], "methods"),
        steering=steering_params,
        boot=config["bootstrap"],
    script:
        "../scripts/capabilities.py"


rule capabilities_table:
    input:
        lambda w: expand(
            "results/capabilities/{model}/{method}.json",
            model=w.model,
            method=capability_methods(),
        ),
    output:
        table="results/tables/capabilities_{model}.csv",
        html=report(
            "results/tables/capabilities_{model}.html",
            caption="../report/capabilities.rst",
            category="Steering",
            subcategory="{model}",
        ),
    log:
        "logs/capabilities_table/{model}.log",
    benchmark:
        "benchmarks/capabilities_table/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=library_code("capabilities_table"),
    script:
        "../scripts/capabilities_table.py"
