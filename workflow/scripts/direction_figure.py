from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.direction_figure(
        snakemake.input.layers,
        snakemake.input.summary,
        snakemake.params.caption,
        snakemake.output.png.removesuffix(".png"),
        snakemake.params.kl_max,
    )
