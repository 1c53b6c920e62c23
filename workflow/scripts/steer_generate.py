from refusal_atlas.pipeline import job, steering

with job.logged(snakemake.log[0], snakemake.threads):
    steering.steer_generate(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        promptset=snakemake.input.promptset,
        method=snakemake.wildcards.method,
        inputs={k: snakemake.input[k] for k in snakemake.input.keys()},
        splits=snakemake.params.splits,
        variants=snakemake.params.variants,
        shard=int(snakemake.wildcards.shard),
        n_shards=snakemake.params.n_shards,
        max_new_tokens=snakemake.params.max_new_tokens,
        batch_size=snakemake.params.batch_size,
        cfg=snakemake.params.steering,
        output=snakemake.output[0],
    )
