from refusal_atlas.pipeline import job, saes

with job.logged(snakemake.log[0], snakemake.threads):
    saes.gate_sae(
        spec=snakemake.params.spec,
        cfg=snakemake.params.sae,
        model_name=snakemake.wildcards.model,
        output_dir=snakemake.output[0],
    )
