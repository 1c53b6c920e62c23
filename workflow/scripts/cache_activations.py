from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.cache_activations(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.promptset,
        snakemake.params.batch_size,
        snakemake.output.acts,
        snakemake.output.index,
    )
