from refusal_atlas.pipeline import job, probes

with job.logged(snakemake.log[0], snakemake.threads):
    probes.jailbreak_mechanism(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        promptset=snakemake.input.promptset,
        responses=snakemake.input.responses,
        features_path=snakemake.input.features,
        sae_dirs=snakemake.input.saes,
        direction_summary=snakemake.input.direction,
        cfg=snakemake.params.cfg,
        boot=snakemake.params.boot,
        outputs={**dict(snakemake.output.items()), "figure_stem": snakemake.output.png.removesuffix(".png")},
        caption=snakemake.params.caption,
    )
