# The vLLM environment does not install refusal_atlas (its torch differs): the import resolves
# through workflow/scripts/refusal_atlas, and refusal_atlas.pipeline.scoring needs only the standard
# library, pandas and transformers (tests/pipeline/test_light_stages.py keeps it so).

from refusal_atlas.pipeline import job, scoring

with job.logged(snakemake.log[0], snakemake.threads):
    scoring.judge_harmbench(
        generations=snakemake.input.gens,
        cfg=snakemake.params.cfg,
        output=snakemake.output[0],
        template_file=snakemake.input.get("template"),
    )
