from refusal_atlas import tables

with tables.logged(snakemake.log[0], snakemake.threads):
    tables.build_promptsets(
        snakemake.params.spec, dict(snakemake.input.items()), snakemake.output[0]
    )
