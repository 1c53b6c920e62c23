from refusal_atlas.pipeline import job, saes

with job.logged(snakemake.log[0], snakemake.threads):
    saes.submodule_corpus(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        dataset=snakemake.input.corpus,
        cfg=snakemake.params.cfg,
        layers=snakemake.params.layers,
        submodule=snakemake.wildcards.submodule,
        acts_out=snakemake.output[0],
    )
