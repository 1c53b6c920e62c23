from refusal_atlas.pipeline import job, saes

with job.logged(snakemake.log[0], snakemake.threads):
    saes.sae_quality_table(
        files=list(snakemake.input),
        model=snakemake.wildcards.model,
        targets=snakemake.params.targets,
        output=snakemake.output[0],
    )
