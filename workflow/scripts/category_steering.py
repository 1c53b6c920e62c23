from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.category_steering(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.promptset,
        snakemake.input.conditions,
        snakemake.input.saes,
        snakemake.input.get("hparams"),
        snakemake.params.cfg,
        snakemake.params.substrings,
        snakemake.params.boot,
        {**dict(snakemake.output.items()), "figure_stem": snakemake.output.png.removesuffix(".png")},
        snakemake.params.caption,
    )
