from refusal_atlas.pipeline import job, figures

with job.logged(snakemake.log[0], snakemake.threads):
    figures.sae_quality_figure(
        table=snakemake.input[0],
        targets=snakemake.params.targets,
        caption=snakemake.params.caption,
        stem=snakemake.output.png.removesuffix(".png"),
    )
