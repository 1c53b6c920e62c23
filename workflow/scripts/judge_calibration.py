from refusal_atlas.pipeline import job, judging

with job.logged(snakemake.log[0], snakemake.threads):
    judging.judge_calibration(
        labelled=snakemake.input.labelled,
        base_dir=snakemake.input.base,
        substrings=snakemake.params.substrings,
        outputs={
            "judge": snakemake.output.judge,
            "agreement": snakemake.output.agreement_csv,
            "per_condition": snakemake.output.per_condition_csv,
            "confusion": snakemake.output.confusion_csv,
            "rows": snakemake.output.rows,
        },
        batch_size=snakemake.params.batch_size,
    )
