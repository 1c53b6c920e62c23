"""The Hugging Face cache as a job on an offline compute node sees it.

Many clusters give compute nodes no internet. There ``snakemake prefetch`` runs first on the login
node and fills the cache; the GPU jobs then run with ``HF_HUB_OFFLINE=1`` and must find every
model, SAE and classifier there. :func:`require_cached` checks that before a job loads anything
heavy, and names the missing artefact and the target that fetches it, instead of the hub
library's connection error mid-job.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

PREFETCH_HINT = ("run `snakemake prefetch` with the same config on a node with internet (the login node), "
                 "then rerun")


class NotCachedError(RuntimeError):
    """A hub artefact a job needs is not in the cache, and the hub is offline."""


def offline() -> bool:
    """Whether huggingface_hub was told to stay offline (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def require_cached(repo_id: str, *, what: str, revision: str | None = None,
                   subfolders: Sequence[str] = ()) -> Path | None:
    """The cached snapshot of ``repo_id`` (with ``subfolders`` in it) when the hub is offline;
    None when it is online, where the hub library fetches what is missing itself."""
    if not offline():
        return None
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise NotCachedError(f"{what}: {where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                             f"the hub is offline (HF_HUB_OFFLINE); {PREFETCH_HINT}") from None
    missing = [s for s in subfolders if not (snapshot / s).exists()]
    if missing:
        raise NotCachedError(f"{what}: {where} is cached without {missing[:3]} and the hub is offline; "
                             f"{PREFETCH_HINT}")
    return snapshot
