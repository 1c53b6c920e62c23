from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.steer_generate(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.promptset,
        snakemake.wildcards.method,
        {k: snakemake.input[k] for k in snakemake.input.keys()},
        snakemake.params.splits,
        snakemake.params.variants,
        int(snakemake.wildcards.shard),
        snakemake.params.n_shards,
        snakemake.params.max_new_tokens,
        snakemake.params.batch_size,
        snakemake.params.steering,
        snakemake.output[0],
    )
