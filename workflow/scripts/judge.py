from refusal_atlas import tables

with tables.logged(snakemake.log[0], snakemake.threads):
    tables.judge(
        snakemake.input[0],
        snakemake.wildcards.judge,
        snakemake.params.substrings,
        snakemake.output[0],
    )
