from refusal_atlas.pipeline import job, scoring

with job.logged(snakemake.log[0], snakemake.threads):
    scoring.benchmark_table(
        summaries=list(snakemake.input),
        judges=snakemake.params.judges,
        caption=snakemake.params.judge_names,
        output=snakemake.output.table,
        figure_stem=snakemake.output.png.removesuffix(".png"),
    )
