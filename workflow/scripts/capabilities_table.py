from refusal_atlas.pipeline import job, capabilities

with job.logged(snakemake.log[0], snakemake.threads):
    capabilities.capabilities_table(
        files=list(snakemake.input),
        model=snakemake.wildcards.model,
        output=snakemake.output[0],
    )
