from refusal_atlas.pipeline import job, data

with job.logged(snakemake.log[0], snakemake.threads):
    data.build_promptsets(
        spec=snakemake.params.spec,
        inputs=dict(snakemake.input.items()),
        output=snakemake.output[0],
    )
