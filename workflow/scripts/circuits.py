from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.circuits(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.promptset,
        snakemake.input.get("categories"),
        snakemake.input.direction,
        snakemake.input.saes,
        snakemake.params.cfg,
        snakemake.params.boot,
        {**dict(snakemake.output.items()), "figure_stem": snakemake.output.png.removesuffix(".png")},
        snakemake.params.caption,
    )
