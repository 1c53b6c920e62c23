"""Pinned, checksummed downloads of public datasets, and their format checks.

Every file is streamed to a temporary sibling, hashed while it streams, checked (sha256, then
format) and only then renamed onto its final path: a failed or killed download leaves nothing a
rerun would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from .io import atomic_path

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class DatasetError(RuntimeError):
    """A dataset could not be fetched or is not what the manifest promises."""


@dataclass(frozen=True)
class DatasetFile:
    collection: str
    path: str
    url: str
    sha256: str
    format: str
    license: str
    items: int | None = None
    token_env: str | None = None  # name of an env var holding a bearer token (never its value)

    def source_url(self, mirror: str | None) -> str:
        if mirror is None:
            return self.url
        return f"{mirror.rstrip('/')}/{self.collection}/{self.path}"


def load_manifest(path: str | os.PathLike) -> dict[str, DatasetFile]:
    """``{"collection/path": DatasetFile}`` from ``resources/datasets.yaml``."""
    raw = yaml.safe_load(Path(path).read_text())
    out = {}
    for collection, spec in raw.items():
        for rel, f in spec["files"].items():
            missing = {"url", "sha256", "format", "license"} - set(f)
            if missing:
                raise DatasetError(f"manifest {path}: {collection}/{rel} lacks {sorted(missing)}")
            out[f"{collection}/{rel}"] = DatasetFile(
                collection=collection,
                path=rel,
                url=f["url"],
                sha256=f["sha256"].lower(),
                format=f["format"],
                license=f["license"],
                items=f.get("items"),
                token_env=f.get("token_env", spec.get("token_env")),
            )
    return out


def check_json_instructions(path: Path, expected_items: int | None = None) -> int:
    """A JSON list of ``{"instruction": str, "category": str | null}`` objects."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path.name}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise DatasetError(f"{path.name}: expected a JSON list, got {type(data).__name__}")
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("instruction"), str):
            raise DatasetError(f"{path.name}: item {i} has no string 'instruction'")
        if not isinstance(item.get("category"), (str, type(None))):
            raise DatasetError(f"{path.name}: item {i} has a non-string 'category'")
    if expected_items is not None and len(data) != expected_items:
        raise DatasetError(f"{path.name}: {len(data)} items, manifest says {expected_items}")
    return len(data)


FORMAT_CHECKS = {"json_instructions": check_json_instructions}


def download(entry: DatasetFile, dest: str | os.PathLike, *, mirror: str | None = None, timeout: float = 60) -> Path:
    """Fetch ``entry`` to ``dest`` atomically; raise :class:`DatasetError` on any mismatch."""
    if entry.format not in FORMAT_CHECKS:
        raise DatasetError(f"{entry.collection}/{entry.path}: unknown format {entry.format!r}")
    url = entry.source_url(mirror)
    request = urllib.request.Request(url, headers={"User-Agent": "refusal-atlas"})
    if entry.token_env:
        token = os.environ.get(entry.token_env)
        if not token:
            raise DatasetError(f"{entry.collection}/{entry.path} is gated: set {entry.token_env} in the environment")
        request.add_header("Authorization", f"Bearer {token}")
    dest = Path(dest)
    log.info("fetching %s/%s from %s", entry.collection, entry.path, url)
    with atomic_path(dest) as tmp:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp, open(tmp, "wb") as fh:
                while chunk := resp.read(CHUNK):
                    digest.update(chunk)
                    fh.write(chunk)
        except urllib.error.HTTPError as e:
            raise DatasetError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise DatasetError(f"{url}: cannot fetch ({getattr(e, 'reason', e)})") from None
        if digest.hexdigest() != entry.sha256:
            raise DatasetError(
                f"{entry.collection}/{entry.path}: sha256 mismatch "
                f"(got {digest.hexdigest()}, manifest pins {entry.sha256}); nothing was written"
            )
        n = FORMAT_CHECKS[entry.format](tmp, entry.items)
    log.info("verified %s/%s: sha256 ok, %s items", entry.collection, entry.path, n)
    return dest
