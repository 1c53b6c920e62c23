from refusal_atlas.pipeline import job, probes

with job.logged(snakemake.log[0], snakemake.threads):
    probes.probes(
        acts_path=snakemake.input.acts,
        index_path=snakemake.input.index,
        responses=snakemake.input.responses,
        features_path=snakemake.input.features,
        sae_dirs=snakemake.input.saes,
        cfg=snakemake.params.cfg,
        boot=snakemake.params.boot,
        outputs={**dict(snakemake.output.items()), "figure_stem": snakemake.output.png.removesuffix(".png")},
        caption=snakemake.params.caption,
    )
