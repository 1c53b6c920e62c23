from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.capabilities(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.wildcards.method,
        {k: snakemake.input[k] for k in snakemake.input.keys()},
        list(snakemake.input.base),
        snakemake.input.corpus,
        snakemake.params.cfg,
        snakemake.params.steering,
        snakemake.params.boot,
        snakemake.output[0],
    )
