# Refusal features: LA-IG attribution per protocol, then the four selectors and the feature table.


rule feature_attribution:
    input:
        unpack(feature_attribution_inputs),
    output:
        scores="results/features/{model}/{promptset}/attribution.{protocol}.safetensors",
        summary="results/features/{model}/{promptset}/attribution.{protocol}.json",
    log:
        "logs/feature_attribution/{model}/{promptset}.{protocol}.log",
    benchmark:
        "benchmarks/feature_attribution/{model}/{promptset}.{protocol}.tsv"
    wildcard_constraints:
        protocol="transductive|heldout",
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: 2 * model_spec(w.model)["mem_mb"],
        runtime=240,
        gpu=gpus("feature_attribution"),
    params:
        code=library_code("feature_attribution"),
        spec=lambda w: load_params(w.model),
        layers=lambda w: sae_layers(w.model),
        cfg=lambda w: section_keys(
            w.model,
            "features",
            "fit_split",
            "eval_split",
            "max_prompts",
            *LA_IG_KEYS,
            "stats_batch_size",
        ),
    script:
        "../scripts/feature_attribution.py"


rule select_features:
    input:
        lambda w: expand(
            "results/features/{model}/{promptset}/attribution.{protocol}.safetensors",
            model=w.model,
            promptset=w.promptset,
            protocol=feature_protocols(w.promptset),
        ),
    output:
        "results/features/{model}/{promptset}/{method}.parquet",
    log:
        "logs/select_features/{model}/{promptset}/{method}.log",
    benchmark:
        "benchmarks/select_features/{model}/{promptset}/{method}.tsv"
    wildcard_constraints:
        method="|".join(config["features"]["methods"]),
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    params:
        code=library_code("select_features"),
        protocols=lambda w: feature_protocols(w.promptset),
        cfg=lambda w: section_keys(w.model, "features", "k0", "k_star"),
    script:
        "../scripts/select_features.py"


rule features_table:
    input:
        lambda w: expand(
            "results/features/{model}/{promptset}/{method}.parquet",
            model=w.model,
            promptset=config["features"]["promptsets"],
            method=config["features"]["methods"],
        ),
    output:
        table="results/tables/features_{model}.csv",
        table_html=report(
            "results/tables/features_{model}.html",
            caption="../report/features.rst",
            category="Refusal features",
            subcategory="{model}",
        ),
        overlap="results/tables/feature_overlap_{model}.csv",
        overlap_html=report(
            "results/tables/feature_overlap_{model}.html",
            caption="../report/feature_overlap.rst",
            category="Refusal features",
            subcategory="{model}",
        ),
    log:
        "logs/features_table/{model}.log",
    benchmark:
        "benchmarks/features_table/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=library_code("features_table"),
    script:
        "../scripts/features_table.py"
