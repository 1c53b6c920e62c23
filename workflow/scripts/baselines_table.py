from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.gather_tables(list(snakemake.input), snakemake.output[0])
