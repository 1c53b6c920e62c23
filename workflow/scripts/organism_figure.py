from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.organism_figure(snakemake.input[0], snakemake.params.caption, snakemake.output.png.removesuffix(".png"))
