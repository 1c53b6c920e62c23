from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.probes(
        snakemake.input.acts,
        snakemake.input.index,
        snakemake.input.responses,
        snakemake.input.features,
        snakemake.input.saes,
        snakemake.params.cfg,
        snakemake.params.boot,
        {**dict(snakemake.output.items()), "figure_stem": snakemake.output.png.removesuffix(".png")},
        snakemake.params.caption,
    )
