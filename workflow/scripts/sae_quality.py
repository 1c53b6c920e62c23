from refusal_atlas.pipeline import job, saes

with job.logged(snakemake.log[0], snakemake.threads):
    saes.sae_quality(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        sae_dir=snakemake.input.sae,
        layer=int(snakemake.wildcards.layer),
        acts_path=snakemake.input.acts,
        index_path=snakemake.input.index,
        batch_size=snakemake.params.batch_size,
        output=snakemake.output[0],
    )
