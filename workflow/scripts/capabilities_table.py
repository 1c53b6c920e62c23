from refusal_atlas import tables

with tables.logged(snakemake.log[0], snakemake.threads):
    tables.capabilities_table(list(snakemake.input), snakemake.wildcards.model, snakemake.output[0])
