from refusal_atlas.pipeline import job, dashboards

with job.logged(snakemake.log[0], snakemake.threads):
    dashboards.feature_dashboards(
        model=snakemake.wildcards.model,
        sae_source=snakemake.params.sae_source,
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        promptset=snakemake.input.promptset,
        contrast=snakemake.input.get("contrast"),
        feature_tables=dict(zip(snakemake.params.cfg["methods"], snakemake.input.features)),
        attribution_summaries=snakemake.input.attributions,
        sae_dirs=snakemake.input.saes,
        hparams=snakemake.input.get("hparams"),
        cfg=snakemake.params.cfg,
        boot=snakemake.params.boot,
        outputs=dict(snakemake.output.items()),
    )
