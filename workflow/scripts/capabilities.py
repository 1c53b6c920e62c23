from refusal_atlas.pipeline import job, capabilities

with job.logged(snakemake.log[0], snakemake.threads):
    capabilities.capabilities(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        method=snakemake.wildcards.method,
        inputs={k: snakemake.input[k] for k in snakemake.input.keys()},
        base_generations=list(snakemake.input.base),
        text=snakemake.input.text,
        cfg=snakemake.params.cfg,
        steering_cfg=snakemake.params.steering,
        boot=snakemake.params.boot,
        output=snakemake.output[0],
    )
