"""Each rule's log file: logging records and tqdm bars (stderr) go to ``logs/<rule>/...``."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("refusal_atlas")


@contextmanager
def logged(log_path: str, threads: int = 1) -> Iterator[None]:
    """Send logging and stderr (tqdm bars) to the rule's log file; use the rule's threads."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", buffering=1) as fh:
        old_err = sys.stderr
        sys.stderr = fh
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        if "SLURM_JOB_ID" in os.environ:
            log.info("%s", slurm_allocation())
        job = getattr(sys.modules.get("__main__"), "snakemake", None)
        if job is not None:
            log.info("params %s", json.dumps(dict(job.params.items()), sort_keys=True, default=str))
        if "torch" in sys.modules:  # light stages never import it
            sys.modules["torch"].set_num_threads(max(1, threads))
        try:
            if job is not None:
                _verify_datasets(job)
            yield
        except Exception:
            log.exception("stage failed")
            raise
        finally:
            root.removeHandler(handler)
            sys.stderr = old_err


def slurm_allocation(env: dict[str, str] | None = None) -> str:
    """What SLURM gave this job, for its log: where a job ran and with which GPUs decides
    whether its timing or a CUDA error means anything.
    """
    env = os.environ if env is None else env
    gpus = env.get("SLURM_JOB_GPUS") or env.get("SLURM_STEP_GPUS") or ""
    n_gpus = len([g for g in gpus.split(",") if g])
    return (f"slurm job {env.get('SLURM_JOB_ID')} on {env.get('SLURMD_NODENAME', '?')}: "
            f"{env.get('SLURM_CPUS_PER_TASK') or env.get('SLURM_CPUS_ON_NODE', '?')} cpus, "
            f"{n_gpus} gpus [{gpus}], CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')}")


def _verify_datasets(job) -> None:
    """Dataset inputs are re-checked against the manifest's sha256 before the stage reads them."""
    paths = [str(p) for p in job.input]
    if not any("resources/datasets/" in p for p in paths):
        return  # the vLLM judge's environment has no pyarrow for the datasets module
    from refusal_atlas.data.datasets import verify_local

    manifest = Path(job.config["datasets"]["manifest"])
    if not manifest.is_absolute() and not manifest.exists():  # relative to the repository
        manifest = Path(job.scriptdir).resolve().parents[1] / manifest  # scriptdir: .../workflow/scripts
    n = verify_local(paths, manifest)
    if n:
        log.info("re-checked %d dataset file(s) against the manifest's sha256", n)
