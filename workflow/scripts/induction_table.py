from refusal_atlas import tables

with tables.logged(snakemake.log[0], snakemake.threads):
    tables.induction_table(list(snakemake.input), snakemake.output.table, snakemake.output.png.removesuffix(".png"))
