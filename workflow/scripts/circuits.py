from refusal_atlas.pipeline import job, categories

with job.logged(snakemake.log[0], snakemake.threads):
    categories.circuits(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        promptset=snakemake.input.promptset,
        category_summary=snakemake.input.get("categories"),
        direction_summary=snakemake.input.direction,
        sae_dirs=snakemake.input.saes,
        submodule_sae_dirs=list(snakemake.input.submodule_saes),
        cfg=snakemake.params.cfg,
        outputs={**dict(snakemake.output.items()), "figure_stem": snakemake.output.png.removesuffix(".png")},
        caption=snakemake.params.caption,
    )
