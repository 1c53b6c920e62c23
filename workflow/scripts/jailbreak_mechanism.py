from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.jailbreak_mechanism(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.promptset,
        snakemake.input.responses,
        snakemake.input.features,
        snakemake.input.saes,
        snakemake.input.direction,
        snakemake.params.cfg,
        snakemake.params.boot,
        {**dict(snakemake.output.items()), "figure_stem": snakemake.output.png.removesuffix(".png")},
        snakemake.params.caption,
    )
