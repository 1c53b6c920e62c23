from refusal_atlas.pipeline import job, model

with job.logged(snakemake.log[0], snakemake.threads):
    model.prepare_model(
        spec=snakemake.params.spec,
        output=snakemake.output[0],
    )
