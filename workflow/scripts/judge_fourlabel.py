from refusal_atlas.pipeline import job, judging

with job.logged(snakemake.log[0], snakemake.threads):
    judging.judge_fourlabel(
        generations=snakemake.input.gens,
        judge_json=snakemake.input.judge,
        base_dir=snakemake.input.base,
        output=snakemake.output[0],
        batch_size=snakemake.params.batch_size,
    )
