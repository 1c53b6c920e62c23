from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.select_features(
        snakemake.wildcards.method,
        dict(zip(snakemake.params.protocols, snakemake.input)),
        snakemake.params.cfg,
        snakemake.output[0],
    )
