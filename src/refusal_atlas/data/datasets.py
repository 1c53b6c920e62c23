"""Pinned, checksummed downloads of public datasets, and their format checks.

Every file is streamed to a temporary sibling, hashed while it streams, checked (sha256, then
format) and only then renamed onto its final path: a failed or killed download leaves nothing a
rerun would trust. A file whose sha256 has not been verified by hand is pinned by the full commit
hash in its URL instead (content-addressed, so immutable), and only from that URL.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


from refusal_atlas.core.io import atomic_path
from refusal_atlas.data.manifest import DatasetError, DatasetFile, load_manifest  # noqa: F401 (re-exported)
from refusal_atlas.data.templates import read_prompt_template

log = logging.getLogger(__name__)
CHUNK = 1 << 20


def _check_count(path: Path, n: int, expected_items: int | None) -> int:
    if expected_items is not None and n != expected_items:
        raise DatasetError(f"{path.name}: {n} items, manifest says {expected_items}")
    return n


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
    return _check_count(path, len(data), expected_items)


def read_catqa(path: str | os.PathLike) -> list[dict]:
    """CatQA's JSON Lines of ``{"Category": str, "Subcategory": str, "Question": str}``, in file order."""
    path, items = Path(path), []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path.name}: not UTF-8 ({e})") from e
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path.name}: line {i} is not JSON ({e})") from e
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item[k].strip()
                                                 for k in ("Category", "Subcategory", "Question")):
            raise DatasetError(f"{path.name}: line {i} lacks a string Category, Subcategory or Question")
        items.append(item)
    return items


def read_or_bench(path: str | os.PathLike) -> list[dict]:
    """An OR-Bench CSV: a header holding ``prompt`` and ``category``, neither empty on any row."""
    path = Path(path)
    try:
        reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path.name}: not a UTF-8 CSV ({e})") from e
    missing = {"prompt", "category"} - set(reader.fieldnames or [])
    if missing:
        raise DatasetError(f"{path.name}: missing columns {sorted(missing)} (header: {reader.fieldnames})")
    for i, row in enumerate(rows, 2):
        if not (row.get("prompt") or "").strip() or not (row.get("category") or "").strip():
            raise DatasetError(f"{path.name}: line {i} has an empty prompt or category")
    return rows


@dataclass(frozen=True)
class ChoiceItem:
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


def read_jsonl_text(path: str | os.PathLike) -> list[str]:
    """The ``text`` of each line of a JSON-lines file (the Pile's layout: ``{"text", "meta"}``)."""
    texts = []
    with open(path, "rb") as fh:
        for i, line in enumerate(fh, 1):
            try:
                row = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DatasetError(f"{Path(path).name}: line {i} is not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DatasetError(f"{Path(path).name}: line {i} has no string 'text'")
            texts.append(row["text"])
    return texts


def _table(path: str | Path, columns: Sequence[str]) -> list[dict]:
    # pyarrow is not imported at the top: the DAG reads the manifest in environments that have only
    # snakemake (a bare `snakemake --lint`).
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{Path(path).name}: not a parquet file ({e})") from e
    missing = set(columns) - set(table.column_names)
    if missing:
        raise DatasetError(f"{Path(path).name}: missing columns {sorted(missing)}")
    return table.select(list(columns)).to_pylist()


def read_arc(path: str | Path) -> list[ChoiceItem]:
    """``allenai/ai2_arc`` parquet: ``id, question, choices {text, label}, answerKey`` (labels A-E or 1-5)."""
    items = []
    for r in _table(path, ["id", "question", "choices", "answerKey"]):
        labels = [str(x) for x in r["choices"]["label"]]
        if r["answerKey"] not in labels:
            raise DatasetError(f"{path}: {r['id']}: answerKey {r['answerKey']!r} is not among {labels}")
        items.append(ChoiceItem(r["id"], r["question"], tuple(r["choices"]["text"]), labels.index(r["answerKey"])))
    return items


def _choice_items(path: str | Path, columns: Sequence[str], id_of) -> list[ChoiceItem]:
    """Rows of ``question, choices, answer`` (an index), each checked against its number of choices."""
    items = []
    for i, r in enumerate(_table(path, columns)):
        if not 0 <= int(r["answer"]) < len(r["choices"]):
            raise DatasetError(f"{path}: row {i}: answer {r['answer']} outside its {len(r['choices'])} choices")
        items.append(ChoiceItem(id_of(i, r), r["question"], tuple(r["choices"]), int(r["answer"])))
    return items


def read_mmlu(path: str | Path) -> list[ChoiceItem]:
    """``cais/mmlu`` parquet: ``question, subject, choices [4], answer`` (0-3); ids are subject:row."""
    return _choice_items(path, ["question", "subject", "choices", "answer"], lambda i, r: f"{r['subject']}:{i}")


def read_wmdp(path: str | Path) -> list[ChoiceItem]:
    """``cais/wmdp`` parquet: ``question, choices [4], answer`` (0-3); ids are the file's folder:row."""
    return _choice_items(path, ["question", "choices", "answer"], lambda i, r: f"{Path(path).parent.name}:{i}")


def read_gsm8k(path: str | Path) -> list[tuple[str, str]]:
    """``openai/gsm8k`` parquet: ``question, answer``; returns (question, the number after ``####``)."""
    out = []
    for i, r in enumerate(_table(path, ["question", "answer"])):
        ref = normalise_number(r["answer"].rsplit("####", 1)[-1]) if "####" in r["answer"] else None
        if ref is None:
            raise DatasetError(f"{path}: row {i}: no '#### <number>' in the reference answer")
        out.append((r["question"], ref))
    return out


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalise_number(text: str, first: bool = False) -> str | None:
    """The last (or ``first``) number in ``text`` without thousands separators or a trailing ``.0``;
    None if none."""
    found = _NUMBER.findall(text.replace("$", ""))
    if not found:
        return None
    value = found[0 if first else -1].replace(",", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def _counted(reader):
    return lambda path, expected_items=None: _check_count(path, len(reader(path)), expected_items)


def check_prompt_template(path: Path, expected_items: int | None = None) -> int:
    """A Python source file that holds a HarmBench classifier prompt (read, never run)."""
    try:
        read_prompt_template(path)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    return _check_count(path, 1, expected_items)


CAPABILITY_BENCHMARKS = ("arc_challenge", "mmlu", "gsm8k")
BENCHMARK_READERS = {"arc_challenge": read_arc, "mmlu": read_mmlu, "gsm8k": read_gsm8k, "wmdp_bio": read_wmdp,
                     "wmdp_cyber": read_wmdp}
FORMAT_CHECKS = {"json_instructions": check_json_instructions, "jsonl_catqa": _counted(read_catqa),
                 "csv_prompt_category": _counted(read_or_bench), "parquet_arc": _counted(read_arc),
                 "parquet_mmlu": _counted(read_mmlu), "parquet_gsm8k": _counted(read_gsm8k),
                 "parquet_wmdp": _counted(read_wmdp), "python_prompt_template": check_prompt_template,
                 "jsonl_text": _counted(read_jsonl_text)}


def _copy_head(entry: DatasetFile, resp, fh, digest) -> None:
    """The first ``entry.head`` lines of the (decompressed) stream; the rest is never fetched."""
    if entry.compression not in (None, "zstd"):
        raise DatasetError(f"{entry.collection}/{entry.path}: unknown compression {entry.compression!r}")
    errors: tuple = ()
    raw = resp
    if entry.compression == "zstd":
        import zstandard

        errors = (zstandard.ZstdError,)
        # shards written by parallel zstd hold several frames
        raw = zstandard.ZstdDecompressor().stream_reader(resp, read_size=1 << 16, read_across_frames=True)
    n = 0
    try:
        for line in io.BufferedReader(raw, 1 << 16):
            digest.update(line)
            fh.write(line)
            n += 1
            if n == entry.head:
                break
    except errors as e:
        raise DatasetError(f"{entry.collection}/{entry.path}: not a {entry.compression} stream ({e})") from None
    if n < entry.head:
        raise DatasetError(f"{entry.collection}/{entry.path}: the upstream file has {n} lines, fewer than the "
                           f"{entry.head} the manifest keeps; nothing was written")


def download(entry: DatasetFile, dest: str | os.PathLike, *, mirror: str | None = None, timeout: float = 60) -> Path:
    """Fetch ``entry`` to ``dest`` atomically; raise :class:`DatasetError` on any mismatch."""
    if entry.format not in FORMAT_CHECKS:
        raise DatasetError(f"{entry.collection}/{entry.path}: unknown format {entry.format!r}")
    if entry.sha256 is None and mirror is not None:
        raise DatasetError(f"{entry.collection}/{entry.path} is pinned by its commit URL only (no sha256 in the "
                           "manifest), so a mirror's copy cannot be verified: add its sha256 or unset datasets.mirror")
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
                if entry.head is not None:
                    _copy_head(entry, resp, fh, digest)
                else:
                    while chunk := resp.read(CHUNK):
                        digest.update(chunk)
                        fh.write(chunk)
        except urllib.error.HTTPError as e:
            raise DatasetError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise DatasetError(f"{url}: cannot fetch ({getattr(e, 'reason', e)})") from None
        if entry.sha256 is not None and digest.hexdigest() != entry.sha256:
            raise DatasetError(
                f"{entry.collection}/{entry.path}: sha256 mismatch "
                f"(got {digest.hexdigest()}, manifest pins {entry.sha256}); nothing was written"
            )
        try:
            n = FORMAT_CHECKS[entry.format](tmp, entry.items)
        except DatasetError as e:  # the checks saw the temporary file; name the real one
            real = f"{entry.collection}/{entry.path}"
            raise DatasetError(str(e).replace(str(tmp), real).replace(tmp.name, real)
                               + " (from " + url + "; nothing was written)") from None
    if entry.sha256 is None:
        log.info("fetched %s/%s from its commit-pinned URL: %s items, sha256 %s (not in the manifest; pin it there)",
                 entry.collection, entry.path, n, digest.hexdigest())
    else:
        log.info("verified %s/%s: sha256 ok, %s items", entry.collection, entry.path, n)
    return dest


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_local(paths: Sequence[str], manifest: str | os.PathLike) -> int:
    """Re-check every ``resources/datasets/<collection>/<path>`` among a job's inputs against the
    manifest's sha256 before it is read: a copy put or edited there by hand would otherwise be
    trusted, since Snakemake reruns no download for a file that exists. Returns how many were checked."""
    entries, checked = None, 0
    for p in paths:
        parts = Path(p).parts
        if "datasets" not in parts or "resources" not in parts or not Path(p).is_file():
            continue
        i = parts.index("datasets")
        if i == 0 or parts[i - 1] != "resources":
            continue
        entries = load_manifest(manifest) if entries is None else entries
        key = "/".join(parts[i + 1:])
        entry = entries.get(key)
        if entry is None or entry.sha256 is None:
            log.warning("%s: no sha256 in the manifest to re-check it against", p)
            continue
        got = sha256_of(p)
        if got != entry.sha256:
            raise DatasetError(f"{p}: sha256 {got} does not match the manifest's {entry.sha256} for {key}; the "
                               "file was changed after its verified download: delete it and rerun to fetch it again")
        checked += 1
    return checked
