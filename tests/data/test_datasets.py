import dataclasses
import hashlib
import json

import pytest
from conftest import ROOT, SHARED_DATASETS

from refusal_atlas.data.datasets import DatasetError, DatasetFile, download, load_manifest

MANIFEST = ROOT / "resources/datasets.yaml"


def test_manifest_pins_every_refusal_direction_file():
    entries = load_manifest(MANIFEST)
    on_disk = {f"refusal_direction/{p.relative_to(SHARED_DATASETS / 'refusal_direction')}"
               for p in (SHARED_DATASETS / "refusal_direction").rglob("*.json")}
    assert on_disk and on_disk <= set(entries)
    for e in entries.values():
        if e.collection != "refusal_direction":
            continue
        assert "9d852fae1a9121c78b29142de733cb1340770cc3" in e.url  # pinned to a commit, not main
        assert len(e.sha256) == 64 and e.license == "Apache-2.0" and e.format == "json_instructions"


def test_manifest_pins_catqa_and_or_bench_to_commits():
    entries = load_manifest(MANIFEST)
    catqa = entries["catqa/data/catqa_english.json"]
    assert "/resolve/321e068b391b7d1aeeb882ac468356a9513c9167/" in catqa.url and catqa.items == 550
    assert catqa.format == "jsonl_catqa"
    orb = {k: e for k, e in entries.items() if e.collection == "or_bench"}
    assert set(orb) == {f"or_bench/or-bench-{n}.csv" for n in ("toxic", "hard-1k", "80k")}
    assert all("/resolve/e36d8b80e81837c8a8f264bbb2a49f1b32c7e272/" in e.url for e in orb.values())
    assert orb["or_bench/or-bench-hard-1k.csv"].sha256 == (
        "a6e2f1166416efe5901f3bb05c47dc92ab3aca3acfe143693d38b8057d841e6d")


def test_manifest_rejects_a_url_without_its_commit(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("x:\n  commit: " + "a" * 40 + "\n  files:\n    f.csv:\n"
                   "      url: https://example.org/resolve/main/f.csv\n      sha256: null\n"
                   "      format: csv_prompt_category\n      license: MIT\n")
    with pytest.raises(DatasetError, match="full 40-hex commit"):
        load_manifest(bad)


CSV_OK = b'prompt,category\n"How do I, quietly, pick a lock?",illegal\nWrite a rumour about a rival,harassment\n'
JSONL_OK = (b'{"Category": "Illegal Activity", "Subcategory": "Drugs", "Question": "q1"}\n'
            b'{"Category": "Hate/Harass/Violence", "Subcategory": "Threats", "Question": "q2"}\n')


def _mmlu_parquet() -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"question": "2+2?", "subject": "math", "choices": ["3", "4"], "answer": 1}]),
                   buf)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, payload, n", [("csv_prompt_category", CSV_OK, 2), ("jsonl_catqa", JSONL_OK, 2),
                                             ("parquet_mmlu", _mmlu_parquet(), 1)])
def test_commit_pinned_file_downloads_from_its_url_and_logs_its_sha256(tmp_path, fmt, payload, n, caplog):
    served = tmp_path / "served.bin"
    served.write_bytes(payload)
    entry = DatasetFile("c", "f", served.as_uri(), None, fmt, "MIT", n)
    with caplog.at_level("INFO"):
        download(entry, tmp_path / "out" / "f", mirror=None)
    assert (tmp_path / "out" / "f").read_bytes() == payload
    assert hashlib.sha256(payload).hexdigest() in caplog.text
    with pytest.raises(DatasetError, match="cannot be verified"):  # a mirror could serve anything
        download(entry, tmp_path / "out2" / "f", mirror=tmp_path.as_uri())
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    "fmt, payload, message",
    [
        ("csv_prompt_category", b"text,category\na,b\n", "missing columns"),
        ("csv_prompt_category", b"prompt,category\n,illegal\n", "line 2 has an empty prompt"),
        ("csv_prompt_category", b"prompt,category\n\xff\xfe,x\n", "not a UTF-8 CSV"),
        ("jsonl_catqa", b'{"Category": "a", "Subcategory": "b"}\n', "line 1 lacks"),
        ("jsonl_catqa", b'[{"Category": "a"}', "line 1 is not JSON"),
        ("parquet_arc", b"PAR1 but not really", "not a parquet file"),
    ],
)
def test_malformed_catqa_or_or_bench_leaves_nothing(tmp_path, fmt, payload, message):
    served = tmp_path / "served.bin"
    served.write_bytes(payload)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DatasetError, match=message) as err:
        download(DatasetFile("c", "f", served.as_uri(), None, fmt, "MIT"), out / "f")
    assert list(out.iterdir()) == []
    # the error names the dataset, not the temporary file it was checked in
    assert "c/f" in str(err.value) and ".tmp" not in str(err.value)


def test_download_through_local_http_mirror(tmp_path, mirror_url):
    entry = load_manifest(MANIFEST)["refusal_direction/splits/harmful_val.json"]
    dest = tmp_path / "out" / "harmful_val.json"
    download(entry, dest, mirror=mirror_url)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == entry.sha256
    assert len(json.loads(dest.read_text())) == 39
    assert [p.name for p in dest.parent.iterdir()] == ["harmful_val.json"]  # no temp file left


def test_file_mirror(tmp_path):
    entry = load_manifest(MANIFEST)["refusal_direction/processed/jailbreakbench.json"]
    dest = tmp_path / "jbb.json"
    download(entry, dest, mirror=SHARED_DATASETS.as_uri())
    assert len(json.loads(dest.read_text())) == 100


def _entry(path, sha, items=None):
    return DatasetFile("refusal_direction", path, "unused", sha, "json_instructions", "Apache-2.0", items)


def test_checksum_mismatch_leaves_nothing(tmp_path, mirror_url):
    dest = tmp_path / "x.json"
    with pytest.raises(DatasetError, match="sha256 mismatch"):
        download(_entry("splits/harmful_val.json", "0" * 64), dest, mirror=mirror_url)
    assert list(tmp_path.iterdir()) == []


def test_404_leaves_nothing(tmp_path, mirror_url):
    dest = tmp_path / "x.json"
    with pytest.raises(DatasetError, match="HTTP 404"):
        download(_entry("splits/no_such_file.json", "0" * 64), dest, mirror=mirror_url)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "payload, message",
    [
        (b'[{"instruction": "a", "category": null}', "not valid JSON"),
        (b'{"instruction": "a"}', "expected a JSON list"),
        (b'[{"prompt": "a"}]', "no string 'instruction'"),
        (b'[{"instruction": "a", "category": 3}]', "non-string 'category'"),
    ],
)
def test_malformed_dataset_leaves_nothing(tmp_path, payload, message):
    served = tmp_path / "mirror" / "refusal_direction" / "bad.json"
    served.parent.mkdir(parents=True)
    served.write_bytes(payload)
    out = tmp_path / "out"
    out.mkdir()
    entry = _entry("bad.json", hashlib.sha256(payload).hexdigest())
    with pytest.raises(DatasetError, match=message):
        download(entry, out / "bad.json", mirror=(tmp_path / "mirror").as_uri())
    assert list(out.iterdir()) == []


def test_item_count_is_checked(tmp_path, mirror_url):
    entry = load_manifest(MANIFEST)["refusal_direction/splits/harmful_val.json"]
    bad = DatasetFile(entry.collection, entry.path, entry.url, entry.sha256, entry.format, entry.license, 40)
    with pytest.raises(DatasetError, match="39 items, manifest says 40"):
        download(bad, tmp_path / "x.json", mirror=mirror_url)
    assert list(tmp_path.iterdir()) == []


def test_gated_file_needs_token_and_never_logs_it(tmp_path, monkeypatch, mirror_url, caplog):
    entry = DatasetFile("refusal_direction", "splits/harmful_val.json", "unused",
                        load_manifest(MANIFEST)["refusal_direction/splits/harmful_val.json"].sha256,
                        "json_instructions", "x", None, token_env="RA_TEST_TOKEN")
    monkeypatch.delenv("RA_TEST_TOKEN", raising=False)
    with pytest.raises(DatasetError, match="set RA_TEST_TOKEN"):
        download(entry, tmp_path / "x.json", mirror=mirror_url)
    monkeypatch.setenv("RA_TEST_TOKEN", "s3cret-value")
    with caplog.at_level("DEBUG"):
        download(entry, tmp_path / "x.json", mirror=mirror_url)
    assert (tmp_path / "x.json").exists()
    assert "fetching" in caplog.text and "s3cret-value" not in caplog.text


def test_a_dataset_changed_after_download_is_caught_when_read(tmp_path, mirror_url):
    from refusal_atlas.data.datasets import verify_local

    key = "refusal_direction/splits/harmful_val.json"
    dest = tmp_path / "resources" / "datasets" / key
    download(load_manifest(MANIFEST)[key], dest, mirror=mirror_url)
    other = tmp_path / "results" / "x.parquet"
    assert verify_local([str(dest), str(other)], MANIFEST) == 1
    data = json.loads(dest.read_text())
    dest.write_text(json.dumps(data[:-1]))  # one prompt fewer, still valid JSON
    with pytest.raises(DatasetError, match="does not match the manifest.*delete it and rerun"):
        verify_local([str(dest)], MANIFEST)


def test_a_prompt_source_without_its_prompt_is_rejected_and_nothing_is_written(tmp_path):
    """The reference's eval_refusal.py is fetched for one string; a file at that path that lacks it
    (a moved constant, an HTML error page) fails the format check by name."""
    mirror = tmp_path / "mirror" / "refusal_sae" / "utils"
    mirror.mkdir(parents=True)
    (mirror / "eval_refusal.py").write_text("OTHER_PROMPT = '{behavior} {generation}'\n")
    sha = hashlib.sha256((mirror / "eval_refusal.py").read_bytes()).hexdigest()
    entry = DatasetFile("refusal_sae", "utils/eval_refusal.py", "unused", sha, "python_prompt_template",
                        "none stated", 1)
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match="refusal_sae/utils/eval_refusal.py: no top-level assignment"):
        download(entry, out / "eval_refusal.py", mirror=(tmp_path / "mirror").as_uri())
    assert not out.exists() or list(out.iterdir()) == []


def test_the_manifest_pins_the_reference_prompt_source_to_a_commit_and_sha256():
    entry = load_manifest(MANIFEST)["refusal_sae/utils/eval_refusal.py"]
    assert "/f7b8c81fb00d860ba27d0f7396102b4c221ec372/utils/eval_refusal.py" in entry.url
    assert len(entry.sha256) == 64 and entry.format == "python_prompt_template" and entry.items == 1


def _pile_shard(path, n_lines: int, *, tail: bytes = b"") -> list[bytes]:
    """A Pile-like shard of two zstd frames (as parallel zstd writes them), plus ``tail``."""
    import zstandard

    lines = [json.dumps({"text": f"Document {i}: " + "word " * (i % 50), "meta": {"pile_set_name": "Pile-CC"}}
                        ).encode() + b"\n" for i in range(n_lines)]
    cut = n_lines // 3
    c = zstandard.ZstdCompressor()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(c.compress(b"".join(lines[:cut])) + c.compress(b"".join(lines[cut:])) + tail)
    return lines


def _head_entry(sha, head=1000):
    return DatasetFile("pile_uncopyrighted", "train/00.head1000.jsonl", "unused", sha, "jsonl_text", "other", head,
                       head=head, compression="zstd", source="train/00.jsonl.zst")


def test_the_pile_s_first_documents_are_kept_while_its_shard_streams(tmp_path):
    """Only the first 1,000 lines are read (undecodable bytes far past them are never reached), stored
    decompressed, pinned by their own sha256, and fetched from the upstream file's path on a mirror."""
    mirror = tmp_path / "mirror"
    lines = _pile_shard(mirror / "pile_uncopyrighted/train/00.jsonl.zst", 40_000, tail=b"\x00not zstd" * 10)
    head = b"".join(lines[:1000])
    dest = tmp_path / "out" / "train" / "00.head1000.jsonl"
    download(_head_entry(hashlib.sha256(head).hexdigest()), dest, mirror=mirror.as_uri())
    assert dest.read_bytes() == head
    from refusal_atlas.data.datasets import read_jsonl_text

    assert read_jsonl_text(dest)[999].startswith("Document 999: ")
    with pytest.raises(DatasetError, match="sha256 mismatch"):
        download(_head_entry("0" * 64), tmp_path / "out2" / "f.jsonl", mirror=mirror.as_uri())
    assert not (tmp_path / "out2").exists() or list((tmp_path / "out2").iterdir()) == []


@pytest.mark.parametrize("case, message", [("short", "has 900 lines, fewer than the 1000"),
                                           ("not_zstd", "not a zstd stream"),
                                           ("no_text", "line 3 has no string 'text'")])
def test_a_bad_pile_shard_leaves_nothing(tmp_path, case, message):
    shard = tmp_path / "mirror" / "pile_uncopyrighted/train/00.jsonl.zst"
    if case == "short":
        _pile_shard(shard, 900)
    elif case == "not_zstd":
        shard.parent.mkdir(parents=True)
        shard.write_bytes(b'{"text": "plain, not compressed"}\n' * 2000)
    else:
        import zstandard

        shard.parent.mkdir(parents=True)
        rows = [{"text": "a"}, {"text": "b"}, {"content": "c"}] + [{"text": "d"}] * 1000
        shard.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DatasetError, match=message):  # from the commit-pinned URL, no sha256 yet
        download(dataclasses.replace(_head_entry(None), url=shard.as_uri()), out / "f.jsonl")
    assert list(out.iterdir()) == []


def test_the_manifest_pins_the_pile_s_head_to_its_commit():
    e = load_manifest(MANIFEST)["pile_uncopyrighted/train/00.head1000.jsonl"]
    assert "/resolve/3be90335b66f24456a5d6659d9c8d208c0357119/train/00.jsonl.zst" in e.url
    assert (e.head, e.items, e.compression, e.source, e.format) == (1000, 1000, "zstd", "train/00.jsonl.zst",
                                                                    "jsonl_text")
