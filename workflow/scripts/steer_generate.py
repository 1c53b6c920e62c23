from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.steer_generate(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.promptset,
        snakemake.wildcards.method,
        snakemake.input.get("direction"),
        snakemake.params.splits,
        snakemake.params.max_new_tokens,
        snakemake.params.batch_size,
        snakemake.output[0],
    )
