from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.sae_quality_table(
        list(snakemake.input),
        snakemake.wildcards.model,
        snakemake.params.targets,
        snakemake.output[0],
    )
