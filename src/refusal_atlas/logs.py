"""Each rule's log file: logging records and tqdm bars (stderr) go to ``logs/<rule>/...``."""

from __future__ import annotations

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
        if "torch" in sys.modules:  # light stages never import it
            sys.modules["torch"].set_num_threads(max(1, threads))
        try:
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
