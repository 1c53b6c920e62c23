from pathlib import Path

from refusal_atlas import stages

cfg = snakemake.config
with stages.logged(snakemake.log[0], snakemake.threads):
    stages.refusal_tune(
        model_name=snakemake.wildcards.model,
        base_dir=snakemake.input.base,
        base_rates=snakemake.input.base_rates,
        promptsets={Path(p).stem: p for p in snakemake.input.promptsets},
        promptset_sources={k: v["source"] for k, v in cfg["promptsets"].items()},
        spec=snakemake.params.spec,
        organism=snakemake.params.organism,
        substrings=snakemake.params.substrings,
        boot=snakemake.params.boot,
        out_dir=snakemake.output.model,
        card=snakemake.output.card,
    )
