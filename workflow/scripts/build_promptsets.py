from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.build_promptsets(
        snakemake.params.spec, dict(snakemake.input.items()), snakemake.output[0]
    )
