import hashlib
import json

import pytest

from refusal_atlas.datasets import DatasetError, DatasetFile, download, load_manifest

from conftest import ROOT, SHARED_DATASETS

MANIFEST = ROOT / "resources/datasets.yaml"


def test_manifest_pins_every_refusal_direction_file():
    entries = load_manifest(MANIFEST)
    on_disk = {f"refusal_direction/{p.relative_to(SHARED_DATASETS / 'refusal_direction')}"
               for p in (SHARED_DATASETS / "refusal_direction").rglob("*.json")}
    assert on_disk and on_disk <= set(entries)
    for e in entries.values():
        assert "9d852fae1a9121c78b29142de733cb1340770cc3" in e.url  # pinned to a commit, not main
        assert len(e.sha256) == 64 and e.license == "Apache-2.0" and e.format == "json_instructions"


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
