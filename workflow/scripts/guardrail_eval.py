from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.guardrail_eval(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.saes,
        snakemake.input.forget,
        snakemake.input.retain,
        snakemake.input.selection,
        snakemake.params.cfg,
        snakemake.params.boot,
        snakemake.params.caption,
        snakemake.output.table,
        snakemake.output.score,
        snakemake.output.png.removesuffix(".png"),
        {k: snakemake.input[k] for k in ("wmdp_bio", "wmdp_cyber", "mmlu") if k in snakemake.input.keys()},
    )
