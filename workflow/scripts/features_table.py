from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.features_table(
        list(snakemake.input),
        snakemake.wildcards.model,
        snakemake.output.table,
        snakemake.output.overlap,
    )
