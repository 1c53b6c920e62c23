from refusal_atlas.pipeline import job, saes

with job.logged(snakemake.log[0], snakemake.threads):
    saes.train_sae(
        acts_path=snakemake.input.acts,
        layer=int(snakemake.wildcards.layer),
        model_name=snakemake.wildcards.model,
        spec=snakemake.params.spec,
        cfg=snakemake.params.sae,
        output_dir=snakemake.output[0],
    )
