from refusal_atlas import tables

with tables.logged(snakemake.log[0], snakemake.threads):
    tables.sae_quality_table(
        list(snakemake.input),
        snakemake.wildcards.model,
        snakemake.params.targets,
        snakemake.output[0],
    )
