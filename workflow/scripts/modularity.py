from refusal_atlas.pipeline import job, categories

with job.logged(snakemake.log[0], snakemake.threads):
    categories.modularity(
        scores_path=snakemake.input.scores,
        index_path=snakemake.input.index,
        steering_summary=snakemake.input.steering,
        cfg=snakemake.params.cfg,
        outputs={**dict(snakemake.output.items()), "figure_stem": snakemake.output.png.removesuffix(".png")},
        caption=snakemake.params.caption,
    )
