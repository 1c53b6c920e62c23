from refusal_atlas.pipeline import job, categories

with job.logged(snakemake.log[0], snakemake.threads):
    categories.category_features(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        acts_path=snakemake.input.acts,
        index_path=snakemake.input.index,
        direction_summary=snakemake.input.direction,
        sae_dirs=snakemake.input.saes,
        cfg=snakemake.params.cfg,
        outputs=dict(snakemake.output.items()),
    )
