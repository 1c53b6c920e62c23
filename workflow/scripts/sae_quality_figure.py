from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.sae_quality_figure(
        snakemake.input[0], snakemake.params.targets, snakemake.params.caption, snakemake.output.png.removesuffix(".png")
    )
