from refusal_atlas import tables

with tables.logged(snakemake.log[0], snakemake.threads):
    tables.sae_quality_figure(
        snakemake.input[0], snakemake.params.targets, snakemake.params.caption, snakemake.output.png.removesuffix(".png")
    )
