"""``snakemake prefetch``: every hub artefact a config needs, fetched on the login node.

The artefacts are the configured hub models, the folders of each pretrained SAE release that the
configured layers use, and the HarmBench classifier where that judge runs. Datasets are already
fetched by the ``download_dataset`` local rule and are part of the same target.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from refusal_atlas.core.packages import package_file

# what a causal LM and its tokenizer load from a hub repository; skips .bin, GGUF and original/ .pth
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*")


@dataclass(frozen=True)
class HubArtifact:
    """One hub repository (at a revision), restricted to ``patterns``, and what needs it."""

    what: str
    repo_id: str
    revision: str | None = None
    patterns: tuple[str, ...] = MODEL_FILES
    subfolders: tuple[str, ...] = field(default_factory=tuple)


def _sae_directory() -> dict:
    import yaml

    path = package_file("sae_lens", "pretrained_saes.yaml")
    if path is None:
        raise RuntimeError("sae_lens is not installed: its release directory names the SAEs to fetch")
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _release_folders(what: str, release: Mapping, sae_id: str, layers) -> HubArtifact:
    """Only the folders of a release's SAEs at ``layers`` (a release holds hundreds)."""
    paths = {s["id"]: s["path"] for s in release["saes"]}
    folders = tuple(paths[sae_id.format(layer=layer)] for layer in sorted(layers))
    return HubArtifact(what, release["repo_id"], None, tuple(f"{f}/*" for f in folders), folders)


def hub_artifacts(config: Mapping) -> list[HubArtifact]:
    """What the jobs of ``config`` would fetch from the hub, one entry per repository."""
    out, directory = [], None
    for name, spec in config["models"].items():
        if spec["source"] == "hub":
            out.append(HubArtifact(f"models.{name}", spec["hub_id"], spec.get("revision")))
        sae = spec["sae"]
        if sae["source"] == "pretrained":
            directory = _sae_directory() if directory is None else directory
            out.append(_release_folders(f"models.{name}.sae", directory[sae["release"]], sae["sae_id"], sae["layers"]))
        for kind, given in sorted(sae.get("submodules", {}).items()):
            if kind in config["categories"]["circuits"]["submodules"]:
                directory = _sae_directory() if directory is None else directory
                out.append(_release_folders(f"models.{name}.sae.submodules.{kind}", directory[given["release"]],
                                            given["sae_id"], sae["layers"]))
        if sae.get("gate"):
            directory = _sae_directory() if directory is None else directory
            release = directory[sae["gate"]["release"]]
            folder = {s["id"]: s["path"] for s in release["saes"]}[
                sae["gate"]["sae_id"].format(layer=config["guardrails"]["unlearning"]["layer"])]
            out.append(HubArtifact(f"models.{name}.sae.gate", release["repo_id"], None, (f"{folder}/*",), (folder,)))
    judge = config["judges"]["harmbench"]
    if "harmbench" in config["evaluation"]["judges"] and not Path(judge["model"]).is_dir():
        out.append(HubArtifact("judges.harmbench", judge["model"], judge.get("revision")))
    return out


def fetch(artifacts: list[HubArtifact]) -> list[dict]:
    """Download each artefact into the Hugging Face cache; the snapshot each resolved to."""
    from huggingface_hub import snapshot_download

    done = []
    for a in artifacts:
        # Tokens come from HF_TOKEN in the environment; huggingface_hub never logs them.
        path = Path(snapshot_download(a.repo_id, revision=a.revision, allow_patterns=list(a.patterns)))
        done.append({**asdict(a), "snapshot": path.name, "files": sum(1 for p in path.rglob("*") if p.is_file())})
    return done
