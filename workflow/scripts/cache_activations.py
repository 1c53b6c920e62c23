from refusal_atlas.pipeline import job, activations

with job.logged(snakemake.log[0], snakemake.threads):
    activations.cache_activations(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        promptset=snakemake.input.promptset,
        batch_size=snakemake.params.batch_size,
        acts_out=snakemake.output.acts,
        index_out=snakemake.output.index,
    )
