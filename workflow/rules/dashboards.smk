# Feature dashboards: a page per feature any selector chose, in the report.


rule feature_dashboards:
    input:
        unpack(dashboard_inputs),
    output:
        pages=report(
            directory("results/dashboards/{model}/pages"),
            patterns=["{rank}-L{layer}-F{feature}.html"],
            caption="../report/feature_dashboard.rst",
            category="Feature dashboards",
            subcategory="{model}",
            labels={"rank": "{rank}", "layer": "{layer}", "feature": "{feature}"},
        ),
        table="results/dashboards/{model}/features.csv",
        html=report(
            "results/dashboards/{model}/features.html",
            caption="../report/feature_dashboards.rst",
            category="Refusal features",
            subcategory="{model}",
        ),
        contexts="results/dashboards/{model}/contexts.parquet",
        effects="results/dashboards/{model}/clamp_effects.parquet",
        contrast="results/dashboards/{model}/contrast.parquet",
    log:
        "logs/feature_dashboards/{model}.log",
    benchmark:
        "benchmarks/feature_dashboards/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=120,
        gpu=gpus("feature_dashboards"),
    params:
        code=library_code("feature_dashboards"),
        spec=lambda w: load_params(w.model),
        sae_source=lambda w: model_spec(w.model)["sae"]["source"],
        cfg=lambda w: dashboard_params(w.model),
        boot=config["bootstrap"],
    script:
        "../scripts/feature_dashboards.py"
