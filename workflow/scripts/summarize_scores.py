from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.summarize_scores(
        list(snakemake.input),
        snakemake.wildcards.model,
        snakemake.params.boot,
        snakemake.output[0],
    )
