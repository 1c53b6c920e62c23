"""ARC-Challenge / MMLU / GSM8K: readers of the published parquet schemas, letter scoring against
unpadded forward passes, and GSM8K's number matching."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from refusal_atlas.data.datasets import ChoiceItem, DatasetError, normalise_number, read_arc, read_gsm8k, read_mmlu
from refusal_atlas.evaluation import benchmarks as ce
from refusal_atlas.lm.interventions import DirectionAddition
from refusal_atlas.lm.modeling import format_chat


def _arc(path, rows):
    pq.write_table(pa.Table.from_pylist([
        {"id": f"Mercury_{i}", "question": q, "choices": {"text": list(t), "label": list(lab)}, "answerKey": key}
        for i, (q, t, lab, key) in enumerate(rows)]), path)


def test_readers_follow_the_published_schemas(tmp_path):
    _arc(tmp_path / "arc.parquet", [("Which is a gas?", ("iron", "oxygen", "wood"), "ABC", "B"),
                                    ("Pick four", ("1", "2", "3", "4"), "1234", "4")])
    arc = read_arc(tmp_path / "arc.parquet")
    assert arc[0] == ChoiceItem("Mercury_0", "Which is a gas?", ("iron", "oxygen", "wood"), 1)
    assert arc[1].answer == 3  # numeric labels map by position
    pq.write_table(pa.Table.from_pylist([{"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"],
                                          "answer": 1}]), tmp_path / "mmlu.parquet")
    assert read_mmlu(tmp_path / "mmlu.parquet") == [ChoiceItem("math:0", "2+2?", ("3", "4", "5", "6"), 1)]
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "She pays 3 * 4 = <<3*4=12>>12.\n#### 1,200"}]),
                   tmp_path / "gsm.parquet")
    assert read_gsm8k(tmp_path / "gsm.parquet") == [("q", "1200")]


def test_malformed_benchmark_files_are_clear_errors(tmp_path):
    _arc(tmp_path / "bad_key.parquet", [("q", ("a", "b"), "AB", "C")])
    with pytest.raises(DatasetError, match="answerKey 'C' is not among"):
        read_arc(tmp_path / "bad_key.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": "q", "choices": ["a"], "answer": 0}]), tmp_path / "m.parquet")
    with pytest.raises(DatasetError, match=r"missing columns \['subject'\]"):
        read_mmlu(tmp_path / "m.parquet")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DatasetError, match="not a parquet file"):
        read_gsm8k(tmp_path / "x.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "no final line"}]), tmp_path / "g.parquet")
    with pytest.raises(DatasetError, match="no '#### <number>'"):
        read_gsm8k(tmp_path / "g.parquet")


@pytest.mark.parametrize("text, number", [
    ("So the answer is 18.", "18"), ("$1,250.00 in total", "1250"), ("-3 degrees, then 7.50", "7.5"),
    ("x = 0.0", "0"), ("no digits here", None), ("first 12 then 13", "13"),
])
def test_normalise_number(text, number):
    assert normalise_number(text) == number


def test_the_first_number_when_asked():
    assert normalise_number("first 12 then 13", first=True) == "12"
    assert normalise_number("$1,250.00 or 3", first=True) == "1250"


@torch.no_grad()
def _letter_argmax(model, tok, item):
    """The prediction from one unpadded forward pass of the item's chat prompt."""
    ids = tok(format_chat(tok, [ce.choice_prompt(item)])[0], add_special_tokens=False, return_tensors="pt").input_ids
    logits = model(input_ids=ids).logits[0, -1]
    return int(logits[ce.letter_ids(tok, len(item.choices))].argmax())


def test_multiple_choice_matches_unpadded_passes_and_sees_the_intervention(tiny):
    model, tok = tiny
    questions = ["Which planet is largest?", "What do bees make? Think of breakfast.", "2 + 2 = ?",
                 "Which metal is liquid at room temperature, of these four common ones?", "Pick one."]
    options = [("Mars", "Jupiter", "Venus", "Earth"), ("honey", "milk", "silk"), ("3", "4", "5", "22", "8"),
               ("mercury", "iron", "tin", "lead"), ("yes", "no")]
    raw = [ChoiceItem(str(i), q, o, 0) for i, (q, o) in enumerate(zip(questions, options))]
    pred = [_letter_argmax(model, tok, it) for it in raw]
    # make items 0, 2, 4 right and 1, 3 wrong by where the answer is put
    items = [ChoiceItem(it.id, it.question, it.choices, p if i % 2 == 0 else (p + 1) % len(it.choices))
             for i, (it, p) in enumerate(zip(raw, pred))]
    got = ce.multiple_choice(model, tok, items, batch_size=2)
    assert got.tolist() == [True, False, True, False, True]
    push = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 50
    steered = ce.multiple_choice(model, tok, items, batch_size=2, intervention=DirectionAddition(push, layer=1))
    assert steered.tolist() != got.tolist()


def test_gsm8k_compares_the_last_number_of_each_answer(tiny, monkeypatch):
    model, tok = tiny
    answers = ["Each box holds 4, so 3 boxes hold 12. The answer is 12.", "It costs $1,200.", "I am not sure."]
    seen = {}

    def fake_generate(m, t, prompts, **kw):
        seen.update(kw, prompts=prompts)
        return answers

    monkeypatch.setattr(ce, "generate", fake_generate)
    out = ce.gsm8k(model, tok, [("q1", "12"), ("q2", "1200"), ("q3", "5")], max_new_tokens=7)
    assert out.dtype == np.bool_ and out.tolist() == [True, True, False]
    assert seen["max_new_tokens"] == 7 and seen["prompts"][0].startswith("q1")


def test_a_prefill_starts_the_assistant_turn_and_the_completion_continues_it(tiny):
    model, tok = tiny
    prompts = ["Which planet is largest?", "Pick one of these two, quickly."]
    got = ce.generate(model, tok, prompts, max_new_tokens=1, batch_size=2, prefills=[ce.ANSWER_PREFILL] * 2)
    for prompt, text in zip(prompts, got):
        ids = tok(format_chat(tok, [prompt])[0] + ce.ANSWER_PREFILL, add_special_tokens=False,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        assert text == tok.decode([nxt], skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="1 prefills for 2 instructions"):
        ce.generate(model, tok, prompts, max_new_tokens=1, prefills=["x"])


def test_the_reference_s_prefilled_letter_must_be_the_answer_and_nothing_else(tiny, monkeypatch):
    model, tok = tiny
    items = [ChoiceItem(str(i), "Q?", ("a", "b", "c", "d"), ans) for i, ans in enumerate([1, 1, 1, 0, 2])]
    seen = {}

    def fake_generate(m, t, prompts, **kw):
        seen.update(kw, prompts=prompts)
        return ["B", "b", "Because", "A", "D"]

    monkeypatch.setattr(ce, "generate", fake_generate)
    got = ce.multiple_choice(model, tok, items, protocol="prefill_greedy")
    assert got.tolist() == [True, True, False, True, False]
    assert seen["max_new_tokens"] == 1 and seen["prefills"] == [ce.ANSWER_PREFILL] * 5
    assert "(A) a\n(B) b\n(C) c\n(D) d" in seen["prompts"][0] and "A, B, C or D" in seen["prompts"][0]
    with pytest.raises(ValueError, match="is not one of"):
        ce.multiple_choice(model, tok, items, protocol="logits")


def test_the_reference_s_gsm8k_reasons_then_reads_the_first_number_after_its_cue(tiny, monkeypatch):
    model, tok = tiny
    calls = []

    def fake_generate(m, t, prompts, **kw):
        calls.append(dict(kw, prompts=prompts))
        if len(calls) == 1:
            return ["3 boxes of 4 is 12.", "Half of 10 is 5."]
        return [" 12 apples, not 13", " 6 or 5"]

    monkeypatch.setattr(ce, "generate", fake_generate)
    out = ce.gsm8k(model, tok, [("q1", "12"), ("q2", "5")], max_new_tokens=9, protocol="reasoning_then_answer")
    assert out.tolist() == [True, False]  # the first number counts, as in the reference
    reasoning, answer = calls
    assert reasoning["max_new_tokens"] == 9 and reasoning["prompts"][0] == "Question: q1\nA: Let's think step by step."
    assert answer["prompts"] == reasoning["prompts"] and answer["max_new_tokens"] == 10
    assert answer["prefills"] == ["3 boxes of 4 is 12." + ce.ANSWER_CUE, "Half of 10 is 5." + ce.ANSWER_CUE]


@pytest.mark.parametrize("protocols", [("letter_logits", "last_number", "per_token", "sae_corpus"),
                                       ("prefill_greedy", "reasoning_then_answer", "reference_batch", "pile")])
def test_capabilities_stage_scores_the_listed_benchmarks(tmp_path, tiny_model_dir, protocols):
    """The rule's stage: CE as before, plus each benchmark's accuracy with n and an interval, on the
    same fixed sample of items whatever the condition, by either protocol; the reference's CE is
    one value per batch, on the Pile's first documents in order."""
    import json

    import pandas as pd

    from refusal_atlas.pipeline import capabilities, openers

    _arc(tmp_path / "arc.parquet", [(f"Question {i}?", ("a", "b", "c", "d"), "ABCD", "ABCD"[i % 4]) for i in range(9)])
    pq.write_table(pa.Table.from_pylist([{"question": f"{i} + 1?", "subject": "math", "choices": ["1", "2", "3", "4"],
                                          "answer": i % 4} for i in range(12)]), tmp_path / "mmlu.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": f"{i} apples?", "answer": f"so\n#### {i}"} for i in range(6)]),
                   tmp_path / "gsm.parquet")
    pd.DataFrame({"instruction": ["Say hi", "Name a colour"], "generation": ["Hi!", "Blue."],
                  "label": "harmless"}).to_parquet(tmp_path / "base.parquet")
    pd.DataFrame({"instruction": ["Some generic text about rivers and hills."], "split": "heldout"}
                 ).to_parquet(tmp_path / "corpus.parquet")
    (tmp_path / "pile.jsonl").write_text("".join(json.dumps({"text": f"Document {i} of the Pile.", "meta": {}}) + "\n"
                                                 for i in range(3)))
    spec = {"dtype": "float32", "device": "cpu", "trust_remote_code": False, "system_prompt": None}
    pile = protocols[3] == "pile"
    cfg = {"max_prompts": None, "max_texts": 2 if pile else None, "max_text_tokens": 32, "batch_size": 4,
           "benchmarks": ["arc_challenge", "mmlu", "gsm8k"],
           "benchmark_max_items": {"arc_challenge": None, "mmlu": 5, "gsm8k": 2}, "gsm8k_max_new_tokens": 4,
           "choice_protocol": protocols[0], "gsm8k_protocol": protocols[1], "ce_reduction": protocols[2],
           "ce_reference_batch": {"responses": 2, "text": 1}, "ce_text": protocols[3]}
    inputs = {"arc_challenge": str(tmp_path / "arc.parquet"), "mmlu": str(tmp_path / "mmlu.parquet"),
              "gsm8k": str(tmp_path / "gsm.parquet")}
    boot = {"n_resamples": 200, "confidence": 0.95, "seed": 0}
    out = tmp_path / "base.json"
    capabilities.capabilities(model_dir=str(tiny_model_dir), spec=spec, method="base", inputs=inputs,
                              base_generations=[str(tmp_path / "base.parquet")],
                              text=str(tmp_path / ("pile.jsonl" if pile else "corpus.parquet")), cfg=cfg,
                              steering_cfg={}, boot=boot,
                              output=str(out))
    d = json.loads(out.read_text())
    assert {k: d[k]["n"] for k in ("arc_challenge", "mmlu", "gsm8k")} == {"arc_challenge": 9, "mmlu": 5, "gsm8k": 2}
    for k in ("arc_challenge", "mmlu", "gsm8k", "response_ce"):
        assert d[k]["ci_low"] <= d[k]["mean"] <= d[k]["ci_high"]
    assert openers.seeded_order(12, "mmlu") == openers.seeded_order(12, "mmlu") != list(range(12))
    assert d["sources"]["arc_challenge"].endswith(f"({protocols[0]})")
    assert d["sources"]["gsm8k"].endswith(f"({protocols[1]})")
    # two answers: one value each, or one for their batch of two
    assert d["ce_reduction"] == protocols[2] and d["response_ce"]["n"] == (2 if protocols[2] == "per_token" else 1)
    # the Pile's first two documents (batches of one), or the corpus's one held-out sequence
    assert d["text_ce"]["n"] == (2 if pile else 1) and ("Pile" in d["sources"]["text"]) == pile
    if pile:
        assert capabilities.generic_texts(str(tmp_path / "pile.jsonl"), "pile", 2) == [
            "Document 0 of the Pile.", "Document 1 of the Pile."]


def test_orderings_follow_the_answer_and_accuracy_counts_each():
    item = ChoiceItem("q", "Which?", ("a", "b", "c", "d"), 2)
    perms = ce.orderings(item)
    assert len(perms) == 24 and len({p.choices for p in perms}) == 24
    assert all(p.choices[p.answer] == "c" for p in perms)


def test_ordering_accuracy_and_robust_items(tiny, tmp_path):
    """Accuracy over orderings equals the per-ordering letter scores; a question is robust only
    when every ordering is right; WMDP's parquet (MMLU's without subject) is read."""
    from refusal_atlas.pipeline.guardrails import _robust_mc_sets

    model, tok = tiny
    items = [ChoiceItem(str(i), f"Question number {i}?", ("red", "green", "blue"), i % 3) for i in range(4)]
    acc = ce.ordering_accuracy(model, tok, items, batch_size=5)
    for it, a in zip(items, acc):
        assert a == pytest.approx(ce.multiple_choice(model, tok, ce.orderings(it), batch_size=3).mean())
    robust = ce.robust_items(model, tok, items, batch_size=5)
    assert [it.id for it in robust] == [it.id for it, a in zip(items, acc) if a == 1.0]
    # a question with one option is right under its only ordering: the screen keeps it
    assert ce.robust_items(model, tok, [ChoiceItem("x", "Only?", ("yes",), 0)]) != []

    (tmp_path / "wmdp-bio").mkdir()
    pq.write_table(pa.Table.from_pylist([{"question": it.question, "choices": list(it.choices), "answer": it.answer}
                                         for it in items]), tmp_path / "wmdp-bio/test.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": it.question, "subject": "s", "choices": list(it.choices),
                                          "answer": it.answer} for it in items]), tmp_path / "mmlu.parquet")
    cfg = {"batch_size": 5, "multiple_choice": {"max_items": 3, "retain_subjects": None}}
    sets = _robust_mc_sets(model, tok, cfg, {"wmdp_bio": str(tmp_path / "wmdp-bio/test.parquet"),
                                                    "mmlu": str(tmp_path / "mmlu.parquet")}, None)
    kept = {it.question for it in robust}
    assert {it.question for it in sets["forget"]} <= kept and {it.question for it in sets["retain"]} <= kept
    assert all(it.id.startswith("wmdp-bio:") for it in sets["forget"])
    # SAEBench's retain side: only the listed MMLU subjects
    pq.write_table(pa.Table.from_pylist([{"question": it.question, "subject": ("history", "law")[i % 2],
                                          "choices": list(it.choices), "answer": it.answer}
                                         for i, it in enumerate(items)]), tmp_path / "mmlu.parquet")
    cfg["multiple_choice"]["retain_subjects"] = ["history"]
    sets = _robust_mc_sets(model, tok, cfg, {"mmlu": str(tmp_path / "mmlu.parquet")}, None)
    assert {it.id.split(":")[0] for it in sets["retain"]} <= {"history"}
    assert {it.question for it in sets["retain"]} == kept & {items[0].question, items[2].question}
    cfg["multiple_choice"]["retain_subjects"] = ["history", "virology"]
    with pytest.raises(ValueError, match="virology"):
        _robust_mc_sets(model, tok, cfg, {"mmlu": str(tmp_path / "mmlu.parquet")}, None)


def test_the_trade_off_figure_gains_a_multiple_choice_panel(tmp_path):
    import matplotlib.image as mpimg
    import pandas as pd

    from refusal_atlas.reporting import figures

    row = {"mode": "dynamic", "config": "q90-n5-c50-dynamic"}
    for part in ("forget", "retain"):
        row.update({f"{part}_accuracy": 0.9, f"{part}_ci_low": 0.8, f"{part}_ci_high": 0.95, f"{part}_n": 10})
    loss_only = pd.DataFrame([row, {**row, "mode": "static"}])
    with_mc = loss_only.assign(**{f"{p}_mc_{k}": v for p in ("forget", "retain")
                                  for k, v in (("accuracy", 0.5), ("ci_low", 0.4), ("ci_high", 0.6), ("n", 7))})
    figures.guardrail_figure(loss_only, {"retain_min": 0.99}, "model, data", str(tmp_path / "a"))
    figures.guardrail_figure(with_mc, {"retain_min": 0.99, "multiple_choice": {}}, "model, data", str(tmp_path / "b"))
    width = {s: mpimg.imread(tmp_path / f"{s}.png").shape[1] for s in ("a", "b")}
    assert width["b"] > 1.8 * width["a"]  # a second panel, side by side
    assert "n=7 questions" in (tmp_path / "b.svg").read_text()
