"""The refusal_direction stage on the tiny model: the refusal-score filter (direction.filter) drops
the train prompts whose base behaviour contradicts their label, before r is fitted, and records
them for the stages that refit r; Arditi et al.'s post-instruction positions (direction.positions)
give one candidate per position and layer."""

import json

import pandas as pd
import torch
import yaml
from conftest import PROMPTS, ROOT
from safetensors.torch import load_file

from refusal_atlas.features import direction
from refusal_atlas.features.direction import diff_in_means
from refusal_atlas.lm.activations import final_positions_resid_post
from refusal_atlas.lm.modeling import load_model, post_instruction_length
from refusal_atlas.pipeline.activations import cache_activations
from refusal_atlas.pipeline.direction import refusal_direction


def _direction_cfg(**over):
    """The direction section: the schema's defaults, then ``over``."""
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    props = schema["properties"]["direction"]["properties"]
    return {**{k: v.get("default") for k, v in props.items() if k != "promptset"}, **over}


SPEC = {"dtype": "float32", "device": "cpu", "trust_remote_code": False, "system_prompt": None}


def _cached_promptset(tmp_path, model_dir) -> list[dict]:
    rows = []
    for split, n in (("train", 6), ("val", 3)):
        for i in range(n):
            rows.append({"id": f"{split}-h{i}", "instruction": PROMPTS[i % len(PROMPTS)] + f" ({split} {i})",
                         "label": "harmful", "variant": "plain", "split": split})
            rows.append({"id": f"{split}-s{i}", "instruction": f"Write a short poem about rivers, number {i}.",
                         "label": "harmless", "variant": "twin", "split": split})
    pd.DataFrame(rows).to_parquet(tmp_path / "set.parquet")
    cache_activations(model_dir=str(model_dir), spec=SPEC, promptset=str(tmp_path / "set.parquet"),
                      batch_size=4, acts_out=str(tmp_path / "acts.safetensors"),
                      index_out=str(tmp_path / "index.parquet"))
    return rows


def test_the_refusal_score_filter_drops_contradicting_train_prompts_before_r_is_fitted(
        tmp_path, tiny_model_dir, monkeypatch):
    rows = _cached_promptset(tmp_path, tiny_model_dir)
    spec = SPEC
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


def test_post_instruction_positions_give_a_candidate_per_position_and_layer(tmp_path, tiny_model_dir):
    rows = _cached_promptset(tmp_path, tiny_model_dir)
    out = {k: str(tmp_path / f"{k}") for k in ("d.safetensors", "l.parquet", "s.json")}
    refusal_direction(model_dir=str(tiny_model_dir), spec=SPEC, acts_path=str(tmp_path / "acts.safetensors"),
                      index_path=str(tmp_path / "index.parquet"),
                      cfg=_direction_cfg(positions="post_instruction", kl_max=1e3, min_induce_score=-1e3,
                                         select_max_new_tokens=2),
                      substrings=["I cannot"], directions_out=out["d.safetensors"], layers_out=out["l.parquet"],
                      summary_out=out["s.json"])
    model, tok = load_model(str(tiny_model_dir))
    n = post_instruction_length(tok)
    table = pd.read_parquet(out["l.parquet"])
    layers = sorted(set(table.layer))
    assert n > 1 and len(layers) >= 2
    assert sorted(zip(table.position, table.layer)) == [(p, l) for p in range(-n, 0) for l in layers]
    assert table.chosen.sum() == 1
    summary = json.loads((tmp_path / "s.json").read_text())
    [chosen] = table[table.chosen].itertuples()
    assert (summary["positions"], summary["position"], summary["layer"]) == ("post_instruction", chosen.position,
                                                                             chosen.layer)
    train = [r for r in rows if r["split"] == "train"]
    acts = final_positions_resid_post(model, tok, [r["instruction"] for r in train], n)
    by_pos = diff_in_means(acts, torch.tensor([r["label"] == "harmful" for r in train]))
    saved = load_file(out["d.safetensors"])["raw_direction"]
    assert torch.allclose(saved, by_pos[chosen.position], atol=1e-5)
    assert not torch.allclose(by_pos[0], by_pos[-1])  # the positions are different candidates
    # the last position is the activation cache's r, so `last` is the special case of one position
    cached = load_file(str(tmp_path / "acts.safetensors"))["resid_post"]
    index = pd.read_parquet(tmp_path / "index.parquet")
    fit = index[index.split == "train"]
    last = diff_in_means(cached[torch.tensor(fit.row.to_numpy())], torch.tensor((fit.label == "harmful").to_numpy()))
    assert torch.allclose(by_pos[-1], last, atol=1e-5)
