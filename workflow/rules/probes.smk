# The jailbreak mechanism and out-of-distribution probes (Yeo et al. 2025, section 4.3).


rule adversarial_responses:
    input:
        unpack(fourlabel_inputs("adversarial_responses")),
        model=final_model_dir,
        promptset=lambda w: f"results/promptsets/{probe_promptset(config)}.parquet",
    output:
        "results/probes/{model}/responses.parquet",
    log:
        "logs/adversarial_responses/{model}.log",
    benchmark:
        "benchmarks/adversarial_responses/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=120,
        gpu=gpus("adversarial_responses"),
    params:
        code=library_code("adversarial_responses"),
        spec=lambda w: load_params(w.model),
        cfg=lambda w: probe_params(w.model, "splits", "max_new_tokens", "batch_size"),
        substrings=config["judges"]["substring"]["substrings"],
    script:
        "../scripts/adversarial_responses.py"


rule jailbreak_mechanism:
    input:
        unpack(probe_feature_inputs),
        model=final_model_dir,
        promptset=lambda w: f"results/promptsets/{probe_promptset(config)}.parquet",
        responses="results/probes/{model}/responses.parquet",
        direction="results/directions/{model}.json",
    output:
        harm_features="results/probes/{model}/harm_features.parquet",
        pairs="results/probes/{model}/mechanism_pairs.parquet",
        summary="results/probes/{model}/mechanism.csv",
        summary_html=report(
            "results/probes/{model}/mechanism.html",
            caption="../report/mechanism.rst",
            category="Jailbreaks and probes",
            subcategory="{model}",
        ),
        wrappers="results/probes/{model}/mechanism_wrappers.csv",
        wrappers_html=report(
            "results/probes/{model}/mechanism_wrappers.html",
            caption="../report/mechanism_wrappers.rst",
            category="Jailbreaks and probes",
            subcategory="{model}",
        ),
        words="results/probes/{model}/suppressing_words.csv",
        words_html=report(
            "results/probes/{model}/suppressing_words.html",
            caption="../report/suppressing_words.rst",
            category="Jailbreaks and probes",
            subcategory="{model}",
        ),
        png=report(
            "results/probes/{model}/mechanism.png",
            caption="../report/mechanism.rst",
            category="Jailbreaks and probes",
            subcategory="{model}",
        ),
        svg=report(
            "results/probes/{model}/mechanism.svg",
            caption="../report/mechanism.rst",
            category="Jailbreaks and probes",
            subcategory="{model}",
        ),
    log:
        "logs/jailbreak_mechanism/{model}.log",
    benchmark:
        "benchmarks/jailbreak_mechanism/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_spec(w.model)["mem_mb"],
        runtime=120,
        gpu=gpus("jailbreak_mechanism"),
    params:
        code=library_code("jailbreak_mechanism"),
        spec=lambda w: load_params(w.model),
        cfg=lambda w: probe_params(
            w.model,
            "protocol",
            "k_star",
            "fit_split",
            "batch_size",
            "harm",
            "refusal_positions",
            "occlusion",
        ),
        boot=config["bootstrap"],
        caption=lambda w: probe_caption(w.model, "jailbreak pairs, all splits"),
    script:
        "../scripts/jailbreak_mechanism.py"


rule probes:
    input:
        unpack(probe_feature_inputs),
        acts=lambda w: f"results/activations/{w.model}/{probe_promptset(config)}.safetensors",
        index=lambda w: f"results/activations/{w.model}/{probe_promptset(config)}.index.parquet",
        responses="results/probes/{model}/responses.parquet",
    output:
        table="results/probes/{model}/probes.parquet",
        summary="results/probes/{model}/probes.csv",
        summary_html=report(
            "results/probes/{model}/probes.html",
            caption="../report/probes.rst",
            category="Jailbreaks and probes",
            subcategory="{model}",
        ),
        dense_layers="results/probes/{model}/dense_layers.csv",
        dense_layers_html=report(
            "results/probes/{model}/dense_layers.html",
            caption="../report/dense_layers.rst",
            category="Jailbreaks and probes",
            subcategory="{model}",
        ),
        png=report(
            "results/probes/{model}/probes.png",
            caption="../report/probes.rst",
            category="Jailbreaks and probes",
            subcategory="{model}",
        ),
        svg=report(
            "results/probes/{model}/probes.svg",
            caption="../report/probes.rst",
            category="Jailbreaks and probes",
            subcategory="{model}",
        ),
    log:
        "logs/probes/{model}.log",
    benchmark:
        "benchmarks/probes/{model}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        code=library_code("probes"),
        cfg=lambda w: probe_params(
            w.model,
            "protocol",
            "k_star",
            "fit_split",
            "val_split",
            "eval_split",
            "random_sets",
            "c_grid",
            "seed",
        ),
        boot=config["bootstrap"],
        caption=lambda w: probe_caption(w.model, "vanilla and adversarial test prompts"),
    script:
        "../scripts/probes.py"
