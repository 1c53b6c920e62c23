from pathlib import Path

from refusal_atlas.pipeline import job, model

with job.logged(snakemake.log[0], snakemake.threads):
    model.base_refusal(
        base_dir=snakemake.input.base,
        promptsets={Path(p).stem: p for p in snakemake.input.promptsets},
        promptset_sources=snakemake.params.sources,
        spec=snakemake.params.spec,
        organism=snakemake.params.organism,
        substrings=snakemake.params.substrings,
        boot=snakemake.params.boot,
        output=snakemake.output[0],
    )
