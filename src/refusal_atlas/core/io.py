"""Atomic writers: a killed job never leaves a half file that a rerun would trust."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pandas as pd

if TYPE_CHECKING:  # torch is imported only by the stages that write tensors
    import torch


def current_umask() -> int:
    # os.umask can only be read by setting it; the old value goes straight back
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(root: Path) -> None:
    """Give ``root`` (and what lies under it) the modes a plain ``open``/``mkdir`` would have had:
    mkstemp and mkdtemp create 0600/0700 whatever the umask, which locks collaborators out of a
    shared results directory."""
    mask = current_umask()
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            os.chmod(dirpath, 0o777 & ~mask)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)
    else:
        os.chmod(root, 0o666 & ~mask)


@contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only on success.

    The result has the modes the umask gives any new file or directory (0644/0755 under the
    usual 022), not the private ones of the temporary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a job killed mid-write (kill -9 runs no cleanup) leaves its temporary; nothing reads it,
    # and the next write of the same output clears it
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _honour_umask(tmp)
        if is_dir and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def read_lines(path: str | os.PathLike) -> list[str]:
    """The items of a one-per-line file (suffixes, passages); blank lines and ``#`` comments skipped."""
    lines = [l.strip() for l in Path(path).read_text(encoding="utf-8").splitlines()]
    return [l for l in lines if l and not l.startswith("#")]


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Strict JSON: a NaN (a rate with nothing to count) is written as null, never as ``NaN``."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_no_nan(obj), indent=2, sort_keys=False, default=_jsonable, allow_nan=False) + "\n")


def _no_nan(x: Any) -> Any:
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, engine="pyarrow", index=False)


def write_csv(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


TABLE_CSS = """
body { font-family: system-ui, sans-serif; margin: 1em; color: #222; }
table { border-collapse: collapse; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .2em .5em; text-align: right; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.text { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
a.csv { display: inline-block; margin-bottom: .6em; }
"""


def table_html(df: pd.DataFrame, title: str, csv_name: str) -> str:
    """A self-contained HTML page of ``df`` (pandas' Styler), with the CSV itself as a download link."""
    import base64

    # a fixed id instead of pandas' random one: the same table makes the same bytes
    styler = df.style.format(precision=4, na_rep="–", escape="html").hide(axis="index").set_uuid("t")
    text_cols = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if text_cols:
        styler = styler.set_td_classes(pd.DataFrame(
            [["text" if c in text_cols else "" for c in df.columns]] * len(df), index=df.index, columns=df.columns))
    csv = base64.b64encode(df.to_csv(index=False).encode("utf-8")).decode("ascii")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{TABLE_CSS}</style></head><body>"
        f'<a class="csv" download="{escape(csv_name)}" href="data:text/csv;base64,{csv}">download {escape(csv_name)}</a>'
        f" ({len(df)} rows)\n{styler.to_html()}</body></html>\n"
    )


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """``path`` (CSV) and its HTML twin beside it (same stem): the Snakemake report offers CSV files
    only as downloads, so every table a rule reports is its ``.html``."""
    path = Path(path)
    write_csv(df, path)
    with atomic_path(path.with_suffix(".html")) as tmp:
        tmp.write_text(table_html(df, path.stem, path.name), encoding="utf-8")


def write_safetensors(
    tensors: dict[str, "torch.Tensor"], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    with atomic_path(path) as tmp:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
