# Data: pinned, checksummed downloads and the prompt sets built from them.


rule download_dataset:
    output:
        "resources/datasets/{collection}/{path}",
    log:
        "logs/download_dataset/{collection}/{path}.log",
    benchmark:
        "benchmarks/download_dataset/{collection}/{path}.tsv"
    wildcard_constraints:
        collection="[A-Za-z0-9_-]+",
        path="[A-Za-z0-9_./-]+\.(json|jsonl|csv|parquet|py)",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    params:
        code=library_code("download_dataset"),
        # the manifest's entry, not its path: a moved checkout must not refetch anything
        entry=lambda w: manifest_entry(f"{w.collection}/{w.path}"),
    script:
        "../scripts/download_dataset.py"


rule build_promptsets:
    input:
        unpack(promptset_inputs),
    output:
        "results/promptsets/{promptset}.parquet",
    log:
        "logs/build_promptsets/{promptset}.log",
    benchmark:
        "benchmarks/build_promptsets/{promptset}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=library_code("build_promptsets"),
        spec=lambda w: promptset_params(w.promptset),
    script:
        "../scripts/build_promptsets.py"


# For compute nodes without internet: every hub model, SAE release folder and classifier the
# config needs goes into the Hugging Face cache here, on the login node (`snakemake prefetch`).
rule prefetch_hub:
    output:
        "results/prefetch/hub.json",
    log:
        "logs/prefetch_hub.log",
    benchmark:
        "benchmarks/prefetch_hub.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=240,
    params:
        code=library_code("prefetch_hub"),
        artifacts=lambda w: prefetch_artifacts(),
    script:
        "../scripts/prefetch_hub.py"
