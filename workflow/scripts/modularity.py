from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.modularity(
        snakemake.input.scores,
        snakemake.input.index,
        snakemake.input.steering,
        snakemake.params.cfg,
        {**dict(snakemake.output.items()), "figure_stem": snakemake.output.png.removesuffix(".png")},
        snakemake.params.caption,
    )
