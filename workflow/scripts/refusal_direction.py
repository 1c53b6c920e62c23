from refusal_atlas.pipeline import job, direction

with job.logged(snakemake.log[0], snakemake.threads):
    direction.refusal_direction(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        acts_path=snakemake.input.acts,
        index_path=snakemake.input.index,
        cfg=snakemake.params.cfg,
        substrings=snakemake.params.substrings,
        directions_out=snakemake.output.directions,
        layers_out=snakemake.output.layers,
        summary_out=snakemake.output.summary,
    )
