from refusal_atlas.pipeline import job, scoring

with job.logged(snakemake.log[0], snakemake.threads):
    scoring.baselines_table(
        inputs=list(snakemake.input),
        output=snakemake.output[0],
    )
