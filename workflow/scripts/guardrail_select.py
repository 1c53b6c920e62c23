from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.guardrail_select(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.saes,
        snakemake.input.forget,
        snakemake.input.retain,
        snakemake.params.cfg,
        snakemake.output.selection,
        snakemake.output.stats,
    )
