"""refusal-atlas: find, test and use the SAE features that make chat LLMs refuse.

The library holds every algorithm of the workflow as small typed functions; the Snakemake
scripts in ``workflow/scripts`` only adapt rule inputs and outputs to these calls.
"""

__version__ = "0.1.0"
