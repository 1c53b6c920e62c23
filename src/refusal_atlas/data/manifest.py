"""The dataset manifest (``resources/datasets.yaml``): what each file is, where it comes from,
and how it is pinned. Light (yaml only): the Snakefile reads it when it builds the DAG, in an
environment that may hold nothing but snakemake (``snakemake --lint``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml


class DatasetError(RuntimeError):
    """A dataset could not be fetched or is not what the manifest promises."""


@dataclass(frozen=True)
class DatasetFile:
    collection: str
    path: str
    url: str
    sha256: str | None  # None: pinned by the commit in ``url`` alone
    format: str
    license: str
    items: int | None = None
    token_env: str | None = None  # name of an env var holding a bearer token (never its value)
    # Keep only the first ``head`` lines of a (``compression``-compressed) line file, read as it
    # streams: the Pile's shards are many GB and the reference reads its first 1,000 texts. The
    # stored file is those lines, decompressed; ``sha256`` pins them, ``source`` names the upstream
    # file (its path in the collection, and so on a mirror).
    head: int | None = None
    compression: str | None = None
    source: str | None = None

    def source_url(self, mirror: str | None) -> str:
        if mirror is None:
            return self.url
        return f"{mirror.rstrip('/')}/{self.collection}/{self.source or self.path}"


def load_manifest(path: str | os.PathLike) -> dict[str, DatasetFile]:
    """``{"collection/path": DatasetFile}`` from ``resources/datasets.yaml``."""
    raw = yaml.safe_load(Path(path).read_text())
    out = {}
    for collection, spec in raw.items():
        for rel, f in spec["files"].items():
            missing = {"url", "sha256", "format", "license"} - set(f)
            if missing:
                raise DatasetError(f"manifest {path}: {collection}/{rel} lacks {sorted(missing)}")
            commit = str(spec.get("commit") or "")
            if not re.fullmatch(r"[0-9a-f]{40}", commit) or commit not in f["url"]:
                raise DatasetError(f"manifest {path}: {collection}/{rel}: its URL must hold the collection's full "
                                   f"40-hex commit (commit: {commit or 'unset'})")
            out[f"{collection}/{rel}"] = DatasetFile(
                collection=collection,
                path=rel,
                url=f["url"],
                sha256=f["sha256"].lower() if f["sha256"] else None,
                format=f["format"],
                license=f["license"],
                items=f.get("items"),
                token_env=f.get("token_env", spec.get("token_env")),
                head=f.get("head"),
                compression=f.get("compression"),
                source=f.get("source"),
            )
            if (f.get("head") is None) != (f.get("source") is None):
                raise DatasetError(f"manifest {path}: {collection}/{rel}: head and source go together (a stored head "
                                   "of an upstream file)")
    return out
