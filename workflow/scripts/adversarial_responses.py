from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.adversarial_responses(
        snakemake.input.model,
        snakemake.params.spec,
        snakemake.input.promptset,
        snakemake.params.cfg,
        snakemake.params.substrings,
        snakemake.output[0],
    )
