from refusal_atlas.pipeline import job, scoring

with job.logged(snakemake.log[0], snakemake.threads):
    scoring.judge(
        generations=snakemake.input[0],
        judge_name=snakemake.wildcards.judge,
        substrings=snakemake.params.substrings,
        output=snakemake.output[0],
    )
