"""Stages of workflow/rules/data.smk: pinned downloads and the prompt sets."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from refusal_atlas.core.io import write_parquet
from refusal_atlas.data import datasets, prompts

log = logging.getLogger("refusal_atlas")


# ---------------------------------------------------------------------------- data
def download_dataset(*, entry: Mapping, dest: str, mirror: str | None, timeout: float) -> None:
    """Fetch one manifest entry (``datasets.DatasetFile`` as a dict) to ``dest``, checked."""
    datasets.download(datasets.DatasetFile(**entry), dest, mirror=mirror, timeout=timeout)


def build_promptsets(*, spec: Mapping, inputs: Mapping[str, str], output: str) -> None:
    if spec["source"] == "bundled":
        suffixes = prompts.read_suffixes(inputs["suffixes"]) if inputs.get("suffixes") else ()
        df = prompts.bundled_promptset(Path(inputs["pairs"]).parent, spec["split_fractions"], spec["seed"], suffixes)
    elif spec["source"] == "wildjailbreak":
        df = prompts.wildjailbreak_promptset(inputs["train"], inputs.get("eval"), spec["split_fractions"],
                                             spec["max_per_type"], spec["seed"])
    elif spec["source"] == "catqa":
        harmless = {k: v for k, v in inputs.items() if k.startswith("harmless_")}
        df = prompts.catqa_promptset(inputs["catqa"], harmless, spec["split_fractions"], spec["max_per_split"],
                                     spec["seed"])
    elif spec["source"] == "or_bench":
        df = prompts.or_bench_promptset(inputs["toxic"], inputs["hard"], inputs.get("extra"), spec["split_fractions"],
                                        spec["max_80k"], spec["seed"])
    elif spec["source"] == "contrast":
        df = prompts.contrast_promptset(inputs["contrast"], spec["split_fractions"], spec["seed"])
    elif spec["source"] == "benchmark":
        df = prompts.benchmark_promptset(inputs["file"], Path(spec["file"]).stem, spec.get("max_prompts", 100))
    else:
        df = prompts.refusal_direction_promptset(inputs, spec["max_per_split"], spec["seed"])
    counts = df.groupby(["split", "label", "variant"]).size()
    log.info("prompt set counts:\n%s", counts.to_string())
    write_parquet(df, output)


def prefetch_hub(*, artifacts: list[Mapping], output: str) -> None:
    """Fill the Hugging Face cache with every hub artefact of the config (``cluster.prefetch``)."""
    from refusal_atlas.cluster.prefetch import HubArtifact, fetch
    from refusal_atlas.core.io import write_json

    items = [HubArtifact(**{**a, "patterns": tuple(a["patterns"]), "subfolders": tuple(a["subfolders"])})
             for a in artifacts]
    done = fetch(items)
    for d in done:
        log.info("%s: %s at %s, %d files", d["what"], d["repo_id"], d["snapshot"], d["files"])
    write_json({"artifacts": done}, output)
