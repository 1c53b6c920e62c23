from refusal_atlas.pipeline import job, scoring

with job.logged(snakemake.log[0], snakemake.threads):
    scoring.summarize_scores(
        score_files=list(snakemake.input.scores),
        model=snakemake.wildcards.model,
        boot=snakemake.params.boot,
        output=snakemake.output[0],
        fourlabel_judge=snakemake.input.get("fourlabel"),
    )
