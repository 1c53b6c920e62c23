"""The refusal_direction stage on the tiny model: the refusal-score filter (direction.filter) drops
the train prompts whose base behaviour contradicts their label, before r is fitted, and records
them for the stages that refit r."""

import json

import pandas as pd
import torch
import yaml
from conftest import PROMPTS, ROOT
from safetensors.torch import load_file

from refusal_atlas.features import direction
from refusal_atlas.features.direction import diff_in_means
from refusal_atlas.pipeline.activations import cache_activations
from refusal_atlas.pipeline.direction import refusal_direction


def _direction_cfg(**over):
    """The direction section: the schema's defaults, then ``over``."""
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    props = schema["properties"]["direction"]["properties"]
    return {**{k: v.get("default") for k, v in props.items() if k != "promptset"}, **over}


def test_the_refusal_score_filter_drops_contradicting_train_prompts_before_r_is_fitted(
        tmp_path, tiny_model_dir, monkeypatch):
    rows = []
    for split, n in (("train", 6), ("val", 3)):
        for i in range(n):
            rows.append({"id": f"{split}-h{i}", "instruction": PROMPTS[i % len(PROMPTS)] + f" ({split} {i})",
                         "label": "harmful", "variant": "plain", "split": split})
            rows.append({"id": f"{split}-s{i}", "instruction": f"Write a short poem about rivers, number {i}.",
                         "label": "harmless", "variant": "twin", "split": split})
    pd.DataFrame(rows).to_parquet(tmp_path / "set.parquet")
    spec = {"dtype": "float32", "device": "cpu", "trust_remote_code": False, "system_prompt": None}
    cache_activations(model_dir=str(tiny_model_dir), spec=spec, promptset=str(tmp_path / "set.parquet"),
                      batch_size=4, acts_out=str(tmp_path / "acts.safetensors"),
                      index_out=str(tmp_path / "index.parquet"))
    contradicting = {"train-h1", "train-s4"}  # a harmful prompt answered, a harmless one refused
    real_score = direction.refusal_score
    train_ids = [r["id"] for r in rows if r["split"] == "train"]

    def scores(logprobs, refusal_ids):
        if len(logprobs) != len(train_ids):  # layer scoring: the real score
            return real_score(logprobs, refusal_ids)
        return torch.tensor([(1.0 if "-h" in i else -1.0) * (-1 if i in contradicting else 1) for i in train_ids])

    monkeypatch.setattr(direction, "refusal_score", scores)
    out = {k: str(tmp_path / f"{k}") for k in ("d.safetensors", "l.parquet", "s.json")}
    refusal_direction(model_dir=str(tiny_model_dir), spec=spec, acts_path=str(tmp_path / "acts.safetensors"),
                      index_path=str(tmp_path / "index.parquet"),
                      cfg=_direction_cfg(filter="refusal_score", layer=1, kl_max=1e3, min_induce_score=-1e3,
                                         select_max_new_tokens=2),
                      substrings=["I cannot"], directions_out=out["d.safetensors"], layers_out=out["l.parquet"],
                      summary_out=out["s.json"])
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["filter"] == "refusal_score" and set(summary["filtered_out_ids"]) == contradicting
    assert summary["n_train"] == {"harmful": 5, "harmless": 5}
    acts = load_file(str(tmp_path / "acts.safetensors"))["resid_post"]
    index = pd.read_parquet(tmp_path / "index.parquet")
    kept = index[(index.split == "train") & ~index.id.isin(contradicting)]
    expected = diff_in_means(acts[torch.tensor(kept.row.to_numpy())], torch.tensor((kept.label == "harmful").to_numpy()))
    assert torch.allclose(load_file(out["d.safetensors"])["raw_direction"], expected)
