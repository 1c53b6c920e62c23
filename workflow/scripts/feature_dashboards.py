from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.feature_dashboards(
        snakemake.wildcards.model,
        snakemake.params.sae_source,
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.promptset,
        dict(zip(snakemake.params.cfg["methods"], snakemake.input.features)),
        snakemake.input.attributions,
        snakemake.input.saes,
        snakemake.input.get("hparams"),
        snakemake.params.cfg,
        snakemake.params.boot,
        dict(snakemake.output.items()),
    )
