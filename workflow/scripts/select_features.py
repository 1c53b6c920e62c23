from refusal_atlas.pipeline import job, features

with job.logged(snakemake.log[0], snakemake.threads):
    features.select_features(
        method=snakemake.wildcards.method,
        attributions=dict(zip(snakemake.params.protocols, snakemake.input)),
        cfg=snakemake.params.cfg,
        output=snakemake.output[0],
    )
