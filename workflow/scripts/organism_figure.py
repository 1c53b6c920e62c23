from refusal_atlas import tables

with tables.logged(snakemake.log[0], snakemake.threads):
    tables.organism_figure(snakemake.input[0], snakemake.params.caption, snakemake.output.png.removesuffix(".png"))
