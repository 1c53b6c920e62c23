from pathlib import Path

from refusal_atlas import stages

with stages.logged(snakemake.log[0], snakemake.threads):
    stages.refusal_tune(
        base_dir=snakemake.input.base,
        promptsets={Path(p).stem: p for p in snakemake.input.promptsets},
        spec=snakemake.params.spec,
        organism=snakemake.params.organism,
        out_dir=snakemake.output[0],
    )
