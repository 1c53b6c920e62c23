from refusal_atlas.pipeline import job, figures

with job.logged(snakemake.log[0], snakemake.threads):
    figures.organism_figure(
        card=snakemake.input[0],
        caption=snakemake.params.caption,
        stem=snakemake.output.png.removesuffix(".png"),
    )
