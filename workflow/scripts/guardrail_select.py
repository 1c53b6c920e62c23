from refusal_atlas.pipeline import job, guardrails

with job.logged(snakemake.log[0], snakemake.threads):
    guardrails.guardrail_select(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        sae_dirs=snakemake.input.saes,
        forget=snakemake.input.forget,
        retain=snakemake.input.retain,
        cfg=snakemake.params.cfg,
        output=snakemake.output.selection,
        stats_out=snakemake.output.stats,
    )
