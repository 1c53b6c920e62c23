from refusal_atlas.pipeline import job, saes

with job.logged(snakemake.log[0], snakemake.threads):
    saes.submodule_sae(
        acts_path=snakemake.input.get("acts"),
        layer=int(snakemake.wildcards.layer),
        submodule=snakemake.wildcards.submodule,
        model_name=snakemake.wildcards.model,
        spec=snakemake.params.spec,
        cfg=snakemake.params.sae,
        output_dir=snakemake.output[0],
    )
