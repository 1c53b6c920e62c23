from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.feature_attribution(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.acts,
        snakemake.input.index,
        snakemake.input.direction,
        list(snakemake.input.saes),
        snakemake.params.layers,
        snakemake.wildcards.protocol,
        snakemake.params.cfg,
        snakemake.output.scores,
        snakemake.output.summary,
    )
