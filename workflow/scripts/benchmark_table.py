from refusal_atlas import tables

with tables.logged(snakemake.log[0], snakemake.threads):
    tables.benchmark_table(
        list(snakemake.input),
        snakemake.params.judges,
        snakemake.params.judge_names,
        snakemake.output.table,
        snakemake.output.png.removesuffix(".png"),
    )
