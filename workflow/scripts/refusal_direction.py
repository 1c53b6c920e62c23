from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.refusal_direction(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.acts,
        snakemake.input.index,
        snakemake.params.cfg,
        snakemake.params.substrings,
        snakemake.output.directions,
        snakemake.output.layers,
        snakemake.output.summary,
    )
