from refusal_atlas.pipeline import job, steering

with job.logged(snakemake.log[0], snakemake.threads):
    steering.gather_generations(
        shards=list(snakemake.input),
        output=snakemake.output[0],
    )
