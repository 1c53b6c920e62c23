from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.sae_corpus(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.corpus,
        snakemake.params.cfg,
        snakemake.params.layers,
        snakemake.params.heldout_only,
        snakemake.output.acts,
        snakemake.output.index,
    )
