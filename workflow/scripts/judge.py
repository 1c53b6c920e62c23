from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.judge(
        snakemake.input[0],
        snakemake.wildcards.judge,
        snakemake.params.substrings,
        snakemake.output[0],
    )
