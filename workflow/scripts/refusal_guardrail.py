from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.refusal_guardrail(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.saes,
        snakemake.input.promptset,
        snakemake.input.features,
        snakemake.input.direction,
        snakemake.params.cfg,
        snakemake.params.substrings,
        snakemake.params.boot,
        snakemake.params.caption,
        snakemake.output.table,
        snakemake.output.generations,
        snakemake.output.png.removesuffix(".png"),
        snakemake.input.own_pool,
    )
