from refusal_atlas.pipeline import job, scoring

with job.logged(snakemake.log[0], snakemake.threads):
    scoring.induction_table(
        summaries=list(snakemake.input),
        output=snakemake.output.table,
        figure_stem=snakemake.output.png.removesuffix(".png"),
    )
