from refusal_atlas.pipeline import job, data

with job.logged(snakemake.log[0], snakemake.threads):
    data.download_dataset(
        entry=snakemake.params.entry,
        dest=snakemake.output[0],
        mirror=snakemake.config["datasets"]["mirror"],
        timeout=snakemake.config["datasets"]["timeout_s"],
    )
