from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.category_features(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.acts,
        snakemake.input.index,
        snakemake.input.direction,
        snakemake.input.saes,
        snakemake.params.cfg,
        dict(snakemake.output.items()),
    )
