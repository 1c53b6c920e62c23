"""CatQA and OR-Bench through the real rules: pinned download (sha256 and format checked) and
build_promptsets, from a local mirror of files in their published formats; and the bundled
contrast set beside them."""

import copy
import hashlib
import json
import subprocess
import sys

import pandas as pd
import yaml
from conftest import ROOT, SHARED_DATASETS

DEFAULT = yaml.safe_load((ROOT / "config/config.yaml").read_text())


def _mirror(tmp_path):
    """A mirror with refusal_direction's real files and small CatQA/OR-Bench files, and a manifest
    whose CatQA/OR-Bench sha256s and counts are those of the small files (their URLs keep the pins)."""
    mirror = tmp_path / "mirror"
    (mirror / "catqa/data").mkdir(parents=True)
    (mirror / "or_bench").mkdir()
    (mirror / "refusal_direction").symlink_to(SHARED_DATASETS / "refusal_direction")
    cats = ["Illegal Activity", "Hate/Harass/Violence", "Malware Viruses"]
    (mirror / "catqa/data/catqa_english.json").write_text("".join(
        json.dumps({"Category": c, "Subcategory": "s", "Question": f"How would one do {c} thing {i}?"}) + "\n"
        for c in cats for i in range(8)))
    for name, n in (("toxic", 6), ("hard-1k", 4), ("80k", 9)):
        pd.DataFrame({"prompt": [f"{name} prompt {c} {i}, comma" for c in ("violence", "privacy") for i in range(n)],
                      "category": [c for c in ("violence", "privacy") for _ in range(n)]}
                     ).to_csv(mirror / f"or_bench/or-bench-{name}.csv", index=False)
    manifest = yaml.safe_load((ROOT / "resources/datasets.yaml").read_text())
    for coll in ("catqa", "or_bench"):
        for rel, f in manifest[coll]["files"].items():
            data = (mirror / coll / rel).read_bytes()
            f["sha256"] = hashlib.sha256(data).hexdigest()
            f["items"] = len(data.decode().strip().splitlines()) - (coll == "or_bench")
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return mirror


def test_catqa_and_or_bench_promptsets_build_through_the_rules(tmp_path):
    mirror = _mirror(tmp_path)
    cfg = copy.deepcopy(DEFAULT)
    cfg["datasets"] = {"manifest": str(tmp_path / "manifest.yaml"), "mirror": mirror.as_uri()}
    cfg["promptsets"]["orb"] = {"source": "or_bench", "max_80k": 5}
    cfg["promptsets"]["cq"] = {"source": "catqa", "max_per_split": {"train": 10, "val": 5, "test": 5}}
    cfg["promptsets"]["ctr"] = {"source": "contrast"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow/Snakefile"), "--configfile", str(path),
         "--replace-workflow-config", "--directory", str(work), "--cores", "2",
         "results/promptsets/orb.parquet", "results/promptsets/cq.parquet", "results/promptsets/ctr.parquet"],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    orb = pd.read_parquet(work / "results/promptsets/orb.parquet")
    assert orb.groupby(["label", "variant"]).size().to_dict() == {("harmful", "plain"): 12, ("harmless", "bait"): 13}
    assert set(orb.category) == {"violence", "privacy"} and set(orb.split) <= {"train", "val", "test"}
    cq = pd.read_parquet(work / "results/promptsets/cq.parquet")
    harm = cq[cq.label == "harmful"]
    assert len(harm) == 24 and set(harm.category) == {"illegal_activity", "hate_harass_violence", "malware_viruses"}
    assert (cq.label == "harmless").sum() == 20
    ctr = pd.read_parquet(work / "results/promptsets/ctr.parquet")  # the over-refusal contrasts, by type
    assert ctr.groupby(["label", "variant"]).size().to_dict() == {("harmful", "plain"): 358, ("harmless", "twin"): 358}
    assert ctr.category.nunique() == 10
    log = (work / "logs/download_dataset/catqa/data/catqa_english.json.log").read_text()
    assert "sha256 ok, 24 items" in log
