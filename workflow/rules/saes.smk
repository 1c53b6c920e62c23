# SAEs: one per configured layer, trained with SAELens on cached activations, taken from a
# SAELens release or from SAELens directories on disk, each with a held-out quality file.


rule sae_corpus:
    input:
        model=final_model_dir,
        corpus=f"resources/datasets/{config['sae_corpus']['dataset']}",
    output:
        acts="results/saes/{model}/corpus/activations.safetensors",
        index="results/saes/{model}/corpus/sequences.parquet",
    log:
        "logs/sae_corpus/{model}.log",
    benchmark:
        "benchmarks/sae_corpus/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: 2 * model_spec(w.model)["mem_mb"],
        runtime=120,
        gpu=gpus("sae_corpus"),
    params:
        code=library_code("sae_corpus"),
        spec=lambda w: load_params(w.model),
        cfg=config["sae_corpus"],
        layers=lambda w: sae_layers(w.model),
        heldout_only=lambda w: model_spec(w.model)["sae"]["source"] != "train",
    script:
        "../scripts/sae_corpus.py"


rule train_sae:
    input:
        acts="results/saes/{model}/corpus/activations.safetensors",
    output:
        directory("results/saes/{model}/layer_{layer}"),
    log:
        "logs/train_sae/{model}/layer_{layer}.log",
    benchmark:
        "benchmarks/train_sae/{model}/layer_{layer}.tsv"
    wildcard_constraints:
        model=models_with_sae_source("train"),
        layer="[0-9]+",
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: 2 * model_spec(w.model)["mem_mb"],
        runtime=120,
        gpu=gpus("train_sae"),
    params:
        code=library_code("train_sae"),
        spec=lambda w: {
            "dtype": model_spec(w.model)["dtype"],
            "device": model_spec(w.model)["device"],
        },
        sae=lambda w: sae_train_params(w.model),
    script:
        "../scripts/train_sae.py"


rule pretrained_sae:
    output:
        directory("results/saes/{model}/layer_{layer}"),
    log:
        "logs/pretrained_sae/{model}/layer_{layer}.log",
    benchmark:
        "benchmarks/pretrained_sae/{model}/layer_{layer}.tsv"
    wildcard_constraints:
        model=models_with_sae_source("pretrained"),
        layer="[0-9]+",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        code=library_code("pretrained_sae"),
        spec=lambda w: load_params(w.model),
        sae=lambda w: sae_pretrained_params(w.model),
    script:
        "../scripts/pretrained_sae.py"


# Marks et al.'s attention and MLP submodules for the circuits (categories.circuits.submodules):
# their SAEs from a SAELens release, or trained like the resid SAEs on a corpus pass of their own.
rule submodule_corpus:
    input:
        model=final_model_dir,
        corpus=f"resources/datasets/{config['sae_corpus']['dataset']}",
    output:
        "results/saes/{model}/corpus/{submodule}.safetensors",
    log:
        "logs/submodule_corpus/{model}/{submodule}.log",
    benchmark:
        "benchmarks/submodule_corpus/{model}/{submodule}.tsv"
    wildcard_constraints:
        submodule="attn|mlp",
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: 2 * model_spec(w.model)["mem_mb"],
        runtime=120,
        gpu=gpus("sae_corpus"),
    params:
        code=library_code("submodule_corpus"),
        spec=lambda w: load_params(w.model),
        cfg=config["sae_corpus"],
        layers=lambda w: sae_layers(w.model),
    script:
        "../scripts/submodule_corpus.py"


rule submodule_sae:
    input:
        unpack(submodule_sae_inputs),
    output:
        directory("results/saes/{model}/{submodule}_{layer}"),
    log:
        "logs/submodule_sae/{model}/{submodule}_{layer}.log",
    benchmark:
        "benchmarks/submodule_sae/{model}/{submodule}_{layer}.tsv"
    wildcard_constraints:
        submodule="attn|mlp",
        layer="[0-9]+",
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: 2 * model_spec(w.model)["mem_mb"],
        runtime=120,
        gpu=gpus("train_sae"),
    params:
        code=library_code("submodule_sae"),
        spec=lambda w: load_params(w.model),
        sae=submodule_sae_params,
    script:
        "../scripts/submodule_sae.py"


# The unlearning guardrail's own SAE (models.<m>.sae.gate), as Muhamed et al. gate with a 16k
# Gemma Scope SAE where the study reads 65k ones.
rule gate_sae:
    output:
        directory("results/saes/{model}/gate"),
    log:
        "logs/gate_sae/{model}.log",
    benchmark:
        "benchmarks/gate_sae/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        code=library_code("gate_sae"),
        spec=lambda w: load_params(w.model),
        sae=lambda w: gate_sae_params(w.model),
    script:
        "../scripts/gate_sae.py"


# A checked copy: the SAE must read this layer's resid_post with the model's width.
rule local_sae:
    input:
        local_sae_dir,
    output:
        directory("results/saes/{model}/layer_{layer}"),
    log:
        "logs/local_sae/{model}/layer_{layer}.log",
    benchmark:
        "benchmarks/local_sae/{model}/layer_{layer}.tsv"
    wildcard_constraints:
        model=models_with_sae_source("local"),
        layer="[0-9]+",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        code=library_code("local_sae"),
        spec=lambda w: {"dtype": model_spec(w.model)["dtype"]},
        d_model=lambda w: MODEL_FACTS[w.model].d_model,
    script:
        "../scripts/local_sae.py"


rule sae_quality:
    input:
        model=final_model_dir,
        sae="results/saes/{model}/layer_{layer}",
        acts="results/saes/{model}/corpus/activations.safetensors",
        index="results/saes/{model}/corpus/sequences.parquet",
    output:
        "results/saes/{model}/quality/layer_{layer}.json",
    log:
        "logs/sae_quality/{model}/layer_{layer}.log",
    benchmark:
        "benchmarks/sae_quality/{model}/layer_{layer}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=60,
        gpu=gpus("sae_quality"),
    params:
        code=library_code("sae_quality"),
        spec=lambda w: load_params(w.model),
        batch_size=config["sae_corpus"]["batch_size"],
    script:
        "../scripts/sae_quality.py"


rule sae_quality_table:
    input:
        lambda w: expand(
            "results/saes/{model}/quality/layer_{layer}.json",
            model=w.model,
            layer=sae_layers(w.model),
        ),
    output:
        table="results/saes/{model}/quality.csv",
        html=report(
            "results/saes/{model}/quality.html",
            caption="../report/sae_quality.rst",
            category="SAEs",
            subcategory="{model}",
        ),
    log:
        "logs/sae_quality_table/{model}.log",
    benchmark:
        "benchmarks/sae_quality_table/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=library_code("sae_quality_table"),
        targets=lambda w: model_spec(w.model)["sae"]["quality_targets"],
    script:
        "../scripts/sae_quality_table.py"
