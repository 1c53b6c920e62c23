from refusal_atlas.pipeline import job, categories

with job.logged(snakemake.log[0], snakemake.threads):
    categories.category_steering(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        promptset=snakemake.input.promptset,
        conditions=snakemake.input.conditions,
        sae_dirs=snakemake.input.saes,
        hparams=snakemake.input.get("hparams"),
        cfg=snakemake.params.cfg,
        substrings=snakemake.params.substrings,
        boot=snakemake.params.boot,
        outputs={**dict(snakemake.output.items()), "figure_stem": snakemake.output.png.removesuffix(".png")},
        caption=snakemake.params.caption,
        fourlabel={k: snakemake.input[k] for k in ("fourlabel_judge", "fourlabel_base") if k in snakemake.input.keys()},
        harmbench=snakemake.params.harmbench and {"cfg": snakemake.params.harmbench,
                                                  "template": snakemake.input.get("harmbench_template")},
    )
