from refusal_atlas import tables

with tables.logged(snakemake.log[0], snakemake.threads):
    tables.direction_figure(
        snakemake.input.layers,
        snakemake.input.summary,
        snakemake.params.caption,
        snakemake.output.png.removesuffix(".png"),
        snakemake.params.kl_max,
    )
