from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.sae_quality(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.sae,
        int(snakemake.wildcards.layer),
        snakemake.input.acts,
        snakemake.input.index,
        snakemake.params.batch_size,
        snakemake.output[0],
    )
