from refusal_atlas import tables

with tables.logged(snakemake.log[0], snakemake.threads):
    tables.summarize_scores(
        list(snakemake.input),
        snakemake.wildcards.model,
        snakemake.params.boot,
        snakemake.output[0],
    )
