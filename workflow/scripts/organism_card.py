from pathlib import Path

from refusal_atlas.pipeline import job, model

with job.logged(snakemake.log[0], snakemake.threads):
    model.organism_card(
        model_name=snakemake.wildcards.model,
        base_dir=snakemake.input.base,
        tuned_dir=snakemake.input.tuned,
        base_rates=snakemake.input.base_rates,
        promptsets={Path(p).stem: p for p in snakemake.input.promptsets},
        promptset_sources=snakemake.params.sources,
        spec=snakemake.params.spec,
        organism=snakemake.params.organism,
        substrings=snakemake.params.substrings,
        boot=snakemake.params.boot,
        card=snakemake.output[0],
    )
