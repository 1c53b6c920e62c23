from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.prepare_model(snakemake.params.spec, snakemake.output[0])
