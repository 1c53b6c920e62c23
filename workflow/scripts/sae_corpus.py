from refusal_atlas.pipeline import job, saes

with job.logged(snakemake.log[0], snakemake.threads):
    saes.sae_corpus(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        dataset=snakemake.input.corpus,
        cfg=snakemake.params.cfg,
        layers=snakemake.params.layers,
        heldout_only=snakemake.params.heldout_only,
        acts_out=snakemake.output.acts,
        index_out=snakemake.output.index,
    )
