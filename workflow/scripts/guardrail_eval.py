from refusal_atlas.pipeline import job, guardrails

with job.logged(snakemake.log[0], snakemake.threads):
    guardrails.guardrail_eval(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        sae_dirs=snakemake.input.saes,
        forget=snakemake.input.forget,
        retain=snakemake.input.retain,
        selection=snakemake.input.selection,
        cfg=snakemake.params.cfg,
        boot=snakemake.params.boot,
        caption=snakemake.params.caption,
        output=snakemake.output.table,
        score_out=snakemake.output.score,
        figure_stem=snakemake.output.png.removesuffix(".png"),
        mc_inputs={k: snakemake.input[k] for k in ("wmdp_bio", "wmdp_cyber", "mmlu") if k in snakemake.input.keys()},
    )
