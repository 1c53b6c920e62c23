from refusal_atlas.pipeline import job, steering

with job.logged(snakemake.log[0], snakemake.threads):
    steering.steering_search(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        promptset=snakemake.input.promptset,
        features_path=snakemake.input.features,
        sae_dirs=list(snakemake.input.saes),
        cfg=snakemake.params.cfg,
        substrings=snakemake.params.substrings,
        boot=snakemake.params.boot,
        output=snakemake.output.hparams,
        sweep_out=snakemake.output.sweep,
        fourlabel={k: snakemake.input[k] for k in ("fourlabel_judge", "fourlabel_base") if k in snakemake.input.keys()},
    )
