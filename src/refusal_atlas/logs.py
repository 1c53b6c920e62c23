"""Each rule's log file: logging records and tqdm bars (stderr) go to ``logs/<rule>/...``."""

from __future__ import annotations

import logging
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


