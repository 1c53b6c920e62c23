from refusal_atlas.pipeline import job, saes

with job.logged(snakemake.log[0], snakemake.threads):
    saes.local_sae(
        sae_dir=snakemake.input[0],
        spec=snakemake.params.spec,
        d_model=snakemake.params.d_model,
        layer=int(snakemake.wildcards.layer),
        model_name=snakemake.wildcards.model,
        output_dir=snakemake.output[0],
    )
