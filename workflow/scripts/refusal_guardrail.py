from refusal_atlas.pipeline import job, guardrails

with job.logged(snakemake.log[0], snakemake.threads):
    guardrails.refusal_guardrail(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        sae_dirs=snakemake.input.saes,
        promptset=snakemake.input.promptset,
        features_path=snakemake.input.features,
        direction_summary=snakemake.input.direction,
        cfg=snakemake.params.cfg,
        substrings=snakemake.params.substrings,
        boot=snakemake.params.boot,
        caption=snakemake.params.caption,
        output=snakemake.output.table,
        gate_out=snakemake.output.generations,
        figure_stem=snakemake.output.png.removesuffix(".png"),
        own_pool=snakemake.input.own_pool,
        fourlabel={k: snakemake.input[k] for k in ("fourlabel_judge", "fourlabel_base") if k in snakemake.input.keys()},
    )
