import sys

# The vLLM environment does not install refusal_atlas (its torch differs); the judge modules
# need only the standard library, pandas and transformers.
sys.path.insert(0, snakemake.params.src)
from refusal_atlas import harmbench, logs  # noqa: E402

with logs.logged(snakemake.log[0], snakemake.threads):
    harmbench.judge_file(snakemake.input.gens, snakemake.params.cfg, snakemake.output[0])
