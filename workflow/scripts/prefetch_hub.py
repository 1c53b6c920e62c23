from refusal_atlas.pipeline import data, job

with job.logged(snakemake.log[0], snakemake.threads):
    data.prefetch_hub(
        artifacts=snakemake.params.artifacts,
        output=snakemake.output[0],
    )
