from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.steering_search(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.promptset,
        snakemake.input.features,
        list(snakemake.input.saes),
        snakemake.params.cfg,
        snakemake.params.substrings,
        snakemake.params.boot,
        snakemake.output.hparams,
        snakemake.output.sweep,
    )
