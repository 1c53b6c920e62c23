from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.pretrained_sae(
        snakemake.params.spec,
        snakemake.params.sae,
        int(snakemake.wildcards.layer),
        snakemake.output[0],
    )
