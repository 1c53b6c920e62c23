from refusal_atlas.pipeline import job, features

with job.logged(snakemake.log[0], snakemake.threads):
    features.feature_attribution(
        model_dir=snakemake.input.model,
        spec=snakemake.params.spec,
        acts_path=snakemake.input.acts,
        index_path=snakemake.input.index,
        direction_summary=snakemake.input.direction,
        sae_dirs=list(snakemake.input.saes),
        layers=snakemake.params.layers,
        protocol=snakemake.wildcards.protocol,
        cfg=snakemake.params.cfg,
        output=snakemake.output.scores,
        summary_out=snakemake.output.summary,
        harmless_acts_path=snakemake.input.get("harmless_acts"),
        harmless_index_path=snakemake.input.get("harmless_index"),
    )
