from refusal_atlas import tables

with tables.logged(snakemake.log[0], snakemake.threads):
    tables.gather_tables(list(snakemake.input), snakemake.output[0])
