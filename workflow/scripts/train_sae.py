from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.train_sae(
        snakemake.input.acts,
        int(snakemake.wildcards.layer),
        snakemake.wildcards.model,
        snakemake.params.spec,
        snakemake.params.sae,
        snakemake.output[0],
    )
