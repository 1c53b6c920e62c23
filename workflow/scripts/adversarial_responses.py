from refusal_atlas.pipeline import job, probes

with job.logged(snakemake.log[0], snakemake.threads):
    probes.adversarial_responses(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        promptset=snakemake.input.promptset,
        cfg=snakemake.params.cfg,
        substrings=snakemake.params.substrings,
        output=snakemake.output[0],
        fourlabel={k: snakemake.input[k] for k in ("fourlabel_judge", "fourlabel_base") if k in snakemake.input.keys()},
    )
