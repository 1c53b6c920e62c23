"""Capability CE: per response token, left padding and batching do not change it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS

from refusal_atlas.evaluation.cross_entropy import response_ce, text_ce
from refusal_atlas.lm.interventions import DirectionalAblation
from refusal_atlas.lm.modeling import end_of_turn_id, format_chat

ANSWERS = ["Paris is the capital.", "Hello there!", "", "A lock has pins and a tension wrench helps.", "No."]


@torch.no_grad()
def manual_ce(model, ids: list[int], first_scored: int) -> float:
    """Mean CE of tokens ``ids[first_scored:]`` from one unpadded forward pass."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    ce = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    return float(ce[first_scored - 1 :].mean())


def test_response_ce_is_normalised_per_response_token(tiny):
    model, tok = tiny
    model = model.double()  # padding changes float32 attention sums in the last digits
    got = response_ce(model, tok, PROMPTS, ANSWERS, batch_size=2)
    eot = end_of_turn_id(tok)
    for prompt, answer, value in zip(format_chat(tok, PROMPTS), ANSWERS, got):
        p = tok(prompt, add_special_tokens=False).input_ids
        r = tok(answer, add_special_tokens=False).input_ids + [eot]
        assert value == pytest.approx(manual_ce(model, p + r, len(p)), abs=1e-6)
    assert np.allclose(got, response_ce(model, tok, PROMPTS, ANSWERS, batch_size=5), equal_nan=True, atol=1e-6)


def test_text_ce_and_an_intervention_that_costs_something(tiny):
    model, tok = tiny
    model = model.double()  # padding changes float32 attention sums in the last digits
    texts = ["The cat sat on the mat.", "Write a poem about a soldier returning from war."]
    got = text_ce(model, tok, texts, batch_size=2)
    for text, value in zip(texts, got):
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids
        assert value == pytest.approx(manual_ce(model, ids, 1), abs=1e-6)
    torch.manual_seed(0)
    ablated = text_ce(model, tok, texts, batch_size=2,
                      intervention=DirectionalAblation(torch.randn(model.config.hidden_size)))
    assert not np.allclose(ablated, got)
    assert np.allclose(text_ce(model, tok, texts, batch_size=2), got)  # the hooks are gone afterwards


def test_the_reference_reduction_divides_each_batch_s_summed_ce_by_its_padded_positions(tiny):
    """Yeo et al.'s get_input_ce_loss: -(log p * mask).mean() over a left-padded batch, so prompt and
    padding positions count as zero; one value per batch of consecutive items."""
    model, tok = tiny
    model = model.double()
    eot = end_of_turn_id(tok)
    seqs, sums = [], []
    for prompt, answer in zip(format_chat(tok, PROMPTS), ANSWERS):
        p = tok(prompt, add_special_tokens=False).input_ids
        r = tok(answer, add_special_tokens=False).input_ids + [eot]
        seqs.append(p + r)
        sums.append(manual_ce(model, p + r, len(p)) * len(r))
    got = response_ce(model, tok, PROMPTS, ANSWERS, batch_size=5, reference_batch=2)
    expected = [sum(sums[i:i + 2]) / (len(sums[i:i + 2]) * max(len(s) for s in seqs[i:i + 2]))
                for i in range(0, len(seqs), 2)]
    assert len(got) == 3 and np.allclose(got, expected, atol=1e-6)
    # a batch's longer prompt lowers its value though no answer changed: it is not a per-token CE
    per_token = response_ce(model, tok, PROMPTS, ANSWERS, batch_size=5)
    assert got.mean() < np.nanmean(per_token) / 2
    texts = ["The cat sat on the mat.", "Write a poem about a soldier returning from war.", "Hi."]
    ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False).input_ids for t in texts]
    text_sums = [manual_ce(model, s, 1) * (len(s) - 1) for s in ids]
    assert np.allclose(text_ce(model, tok, texts, reference_batch=3),
                       [sum(text_sums) / (3 * max(len(s) for s in ids))], atol=1e-6)
