# The vLLM environment does not install refusal_atlas (its torch differs): the import resolves
# through workflow/scripts/refusal_atlas, and the judge modules need only the standard library,
# pandas and transformers.
from refusal_atlas import harmbench, logs

with logs.logged(snakemake.log[0], snakemake.threads):
    harmbench.judge_file(snakemake.input.gens, snakemake.params.cfg, snakemake.output[0])
