from refusal_atlas.pipeline import job, figures

with job.logged(snakemake.log[0], snakemake.threads):
    figures.direction_figure(
        layers=snakemake.input.layers,
        summary=snakemake.input.summary,
        caption=snakemake.params.caption,
        stem=snakemake.output.png.removesuffix(".png"),
        kl_max=snakemake.params.kl_max,
    )
