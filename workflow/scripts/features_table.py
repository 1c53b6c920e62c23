from refusal_atlas.pipeline import job, features

with job.logged(snakemake.log[0], snakemake.threads):
    features.features_table(
        files=list(snakemake.input),
        model=snakemake.wildcards.model,
        output=snakemake.output.table,
        overlap_out=snakemake.output.overlap,
    )
