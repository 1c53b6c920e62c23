from refusal_atlas import tables

with tables.logged(snakemake.log[0], snakemake.threads):
    tables.download_dataset(
        snakemake.params.entry,
        snakemake.output[0],
        snakemake.config["datasets"]["mirror"],
        snakemake.config["datasets"]["timeout_s"],
    )
