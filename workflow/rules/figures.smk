# Figures of the stages whose own rules write no figure: the organism's card, the refusal
# direction per layer and SAE quality per layer. Their own rules stay untouched, so a new
# figure reruns nothing upstream.


rule organism_figure:
    input:
        "results/models/{model}/model_card.json",
    output:
        png=report(
            "results/figures/{model}/organism.png",
            caption="../report/organism.rst",
            category="Model",
            subcategory="{model}",
        ),
        svg=report(
            "results/figures/{model}/organism.svg",
            caption="../report/organism.rst",
            category="Model",
            subcategory="{model}",
        ),
    log:
        "logs/organism_figure/{model}.log",
    benchmark:
        "benchmarks/organism_figure/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=library_code("organism_figure"),
        caption=lambda w: organism_caption(w.model),
    script:
        "../scripts/organism_figure.py"


rule direction_figure:
    input:
        layers="results/directions/{model}.layers.parquet",
        summary="results/directions/{model}.json",
    output:
        png=report(
            "results/figures/{model}/direction.png",
            caption="../report/direction.rst",
            category="Refusal direction",
            subcategory="{model}",
        ),
        svg=report(
            "results/figures/{model}/direction.svg",
            caption="../report/direction.rst",
            category="Refusal direction",
            subcategory="{model}",
        ),
    log:
        "logs/direction_figure/{model}.log",
    benchmark:
        "benchmarks/direction_figure/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=library_code("direction_figure"),
        caption=lambda w: direction_caption(w.model),
        kl_max=lambda w: model_section(w.model, "direction")["kl_max"],
    script:
        "../scripts/direction_figure.py"


rule sae_quality_figure:
    input:
        "results/saes/{model}/quality.csv",
    output:
        png=report(
            "results/figures/{model}/sae_quality.png",
            caption="../report/sae_quality.rst",
            category="SAEs",
            subcategory="{model}",
        ),
        svg=report(
            "results/figures/{model}/sae_quality.svg",
            caption="../report/sae_quality.rst",
            category="SAEs",
            subcategory="{model}",
        ),
    log:
        "logs/sae_quality_figure/{model}.log",
    benchmark:
        "benchmarks/sae_quality_figure/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=library_code("sae_quality_figure"),
        targets=lambda w: model_spec(w.model)["sae"]["quality_targets"],
        caption=lambda w: sae_quality_caption(w.model),
    script:
        "../scripts/sae_quality_figure.py"
