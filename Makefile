# Two commands set up a fresh clone and use it: `make run` (the embedded default) and
# `make test` (the suite CI runs). Both create .venv first, torch's CPU wheel before the rest.
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup run test lint report results

$(STAMP): pyproject.toml .ci/install.sh
	bash .ci/install.sh

setup: $(STAMP)

run: setup
	$(VENV)/bin/snakemake --cores 2

test: setup
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

lint: setup
	$(VENV)/bin/snakemake --lint
	$(VENV)/bin/snakefmt --check workflow

report: setup
	$(VENV)/bin/snakemake --report report.html

# docs/results.md from this checkout's results/ (after `make run`)
results: setup
	$(VENV)/bin/python -m refusal_atlas.reporting.results_page --run . --out docs/results.md
