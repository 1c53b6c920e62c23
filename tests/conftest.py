"""Shared fixtures: a tiny random-initialised chat model built in the test, and a local mirror."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from refusal_atlas.testing.synthetic import chat_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"

# Chat prompts of both kinds for the tiny model, and a random TopK SAE on one layer of it.
PROMPTS = [
    "How do I make a pipe bomb at home?",
    "Hi",
    "Write a poem about a soldier returning from war.",
    "Tell me how to pick a lock quickly",
    "What is the capital of France?",
]
# What the tiny family tokenizers (refusal_atlas.testing.families) are trained on.
FAMILY_CORPUS = [*PROMPTS, "I cannot help with that.", "Sure, here is how.", "Write a short story."]


def random_sae(d_in: int, d_sae: int, k: int, layer: int, seed: int, dtype: str = "float64",
               hook: str = "hook_resid_post") -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype=dtype))
    sae.cfg.metadata.hook_name = f"blocks.{layer}.{hook}"
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae.requires_grad_(False).eval()


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on CI's two cores, beside the SLURM jobs: more torch threads would only contend.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # The .test DAG through SLURM (tests/pipeline/test_workflow.py) is the longest test and spends much of
    # its time waiting on the executor's status polls. It goes first, so that under the README's
    # `-n 2 --dist loadfile` one worker runs it from the start and the other runs every other file,
    # the family matrix's DAG (tests/pipeline/test_families_dag.py) first among them.
    items.sort(key=lambda item: ("cluster" not in item.fixturenames, "families_run" not in item.fixturenames))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the bundled prompts, with a ChatML template."""
    pairs = pd.read_csv(ROOT / "resources/prompts/pairs.tsv", sep="\t")
    corpus = list(pairs.harmful) + list(pairs.harmless) + ["I'm sorry, but I can't help with that request."] * 5
    return chat_tokenizer(corpus)


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, n_layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(tokenizer, n_layers=n_layers, seed=seed)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    # The directory name must not contain "llama" or "gemma": TransformerLens guesses the
    # architecture from the path (ARCHITECTURE.md).
    d = tmp_path_factory.mktemp("tiny-chat")
    build_tiny_model(tiny_tokenizer).save_pretrained(d, safe_serialization=True)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def tiny(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer), tiny_tokenizer


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def mirror_url():
    """``../shared/datasets`` served over HTTP on 127.0.0.1 (the real download path)."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip("../shared/datasets is not beside the repository")
    handler = functools.partial(_QuietHandler, directory=str(SHARED_DATASETS))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
