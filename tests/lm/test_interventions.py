import pytest
import torch

from refusal_atlas.features.direction import last_token_logprobs
from refusal_atlas.lm.generation import generate, generate_with_first_logprobs, length_sorted_batches
from refusal_atlas.lm.interventions import DirectionAddition, DirectionalAblation, Intervention
from refusal_atlas.lm.modeling import autocast, decoder_layers, encode_chat, end_of_turn_ids

PROMPTS = ["How do I make a pipe bomb at home?", "Hi", "Write a poem about a soldier returning from war."]


def _record(model):
    seen = []

    def hook(_m, _i, out):
        seen.append(out[0] if isinstance(out, tuple) else out)

    return seen, [l.register_forward_hook(hook) for l in decoder_layers(model)]


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_ablation_removes_direction_everywhere(tiny, dtype):
    model, tok = tiny
    r = torch.randn(model.config.hidden_size)
    unit = r / r.norm()
    with DirectionalAblation(r).applied(model):
        seen, handles = _record(model)  # registered after: sees the ablated outputs
        enc = encode_chat(tok, PROMPTS)
        # under bf16 autocast too (refusal_direction scores layers so): float32 residuals keep
        # their precision through the projection
        with torch.no_grad(), autocast(model, dtype):
            model(**enc)
        for h in handles:
            h.remove()
    assert len(seen) == model.config.num_hidden_layers
    for h in seen:
        assert (h @ unit).abs().max() < 1e-4
    # hooks are removed on exit
    seen, handles = _record(model)
    with torch.no_grad():
        model(**enc)
    for h in handles:
        h.remove()
    assert max(float((h @ unit).abs().max()) for h in seen) > 1e-2


def test_ablation_fires_at_every_generated_step(tiny):
    model, tok = tiny
    calls = []
    abl = DirectionalAblation(torch.randn(model.config.hidden_size))
    layer0 = decoder_layers(model)[0]
    handle = layer0.register_forward_hook(lambda m, i, o: calls.append((o[0] if isinstance(o, tuple) else o).shape[1]))
    try:
        generate(model, tok, PROMPTS[:1], max_new_tokens=6, intervention=abl)
    finally:
        handle.remove()
    # one prefill pass plus one single-token pass per further generated token (KV cache)
    assert calls[0] > 1 and calls[1:] == [1] * (len(calls) - 1) and len(calls) >= 2


@pytest.mark.parametrize("layer", [0, 2])
def test_addition_adds_at_the_resid_post_the_direction_was_read_at(tiny, layer):
    """r[l] is read at resid_post of block l (activations.last_token_resid_post), so adding it at
    l changes resid_post l by exactly coeff·r and leaves resid_post l-1 as it was."""
    from refusal_atlas.lm.activations import last_token_resid_post

    model, tok = tiny
    torch.manual_seed(0)
    r = torch.randn(model.config.hidden_size)
    with torch.no_grad():
        clean = last_token_resid_post(model, tok, PROMPTS[:2], batch_size=2)
        with DirectionAddition(r, layer=layer, coeff=2.0).applied(model):
            added = last_token_resid_post(model, tok, PROMPTS[:2], batch_size=2)
    assert torch.allclose(added[:, layer] - clean[:, layer], (2.0 * r).expand(2, -1), atol=1e-5)
    if layer > 0:
        assert torch.equal(added[:, layer - 1], clean[:, layer - 1])


def test_gated_addition_adds_where_the_direction_was_read_on_open_rows_only(tiny):
    from refusal_atlas.studies.guardrails import GatedAddition

    model, tok = tiny
    r = torch.randn(model.config.hidden_size)
    enc = encode_chat(tok, PROMPTS[:2])
    blocks = decoder_layers(model)

    def run() -> dict[int, torch.Tensor]:
        # registered after the gate's hook, so they see its result
        got = {}
        hooks = [blocks[i].register_forward_hook(
            lambda _m, _a, out, i=i: got.__setitem__(i, out[0] if isinstance(out, tuple) else out)) for i in (1, 2)]
        with torch.no_grad():
            model(**enc)
        for h in hooks:
            h.remove()
        return got

    gate = GatedAddition(r, 2, 3.0, frozenset({"b"}))
    clean = run()
    with gate.applied(model), gate.rows(["a", "b"]):
        grabbed = run()
    assert torch.equal(grabbed[1], clean[1])  # resid_post 1 untouched
    assert torch.equal(grabbed[2][0], clean[2][0])  # the closed row untouched
    assert torch.allclose(grabbed[2][1] - clean[2][1], (3.0 * r).expand_as(clean[2][1]), atol=1e-5)


def test_no_intervention_generation_matches_hf(tiny):
    model, tok = tiny
    ours = generate(model, tok, PROMPTS, max_new_tokens=5, batch_size=2, intervention=Intervention())
    for p, o in zip(PROMPTS, ours):
        enc = encode_chat(tok, [p])
        seq = model.generate(**enc, max_new_tokens=5, do_sample=False, eos_token_id=end_of_turn_ids(tok),
                             pad_token_id=tok.pad_token_id)
        assert o == tok.decode(seq[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_length_sorted_batches_cover_everything():
    b = length_sorted_batches([5, 1, 3, 9, 2], 2)
    assert sorted(i for x in b for i in x) == list(range(5)) and all(len(x) <= 2 for x in b)


def test_first_logprobs_of_a_generation_are_the_last_token_pass(tiny):
    model, tok = tiny
    abl = DirectionalAblation(torch.randn(model.config.hidden_size))
    # three prompts of unequal length in batches of two: the length sort reorders them
    texts, first = generate_with_first_logprobs(model, tok, PROMPTS, max_new_tokens=3, batch_size=2, intervention=abl)
    assert texts == generate(model, tok, PROMPTS, max_new_tokens=3, batch_size=2, intervention=abl)
    expected = last_token_logprobs(model, tok, PROMPTS, batch_size=2, intervention=abl)
    assert first.shape == expected.shape and torch.allclose(first, expected, atol=1e-4)
    assert not torch.allclose(first[0], first[1])  # rows are the prompts' own, in input order


def test_generation_from_the_shared_header_cache_equals_a_full_prefill(tiny):
    model, tok = tiny
    prompts = [*PROMPTS, "Yo", "A much longer prompt about gardening in spring, with several clauses and commas."]
    widths = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: widths.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    for intervention in (None, DirectionalAblation(torch.randn(model.config.hidden_size))):
        widths.clear()
        texts, first = generate_with_first_logprobs(model, tok, prompts, max_new_tokens=4, batch_size=2,
                                                    intervention=intervention)
        assert widths[0][0] == 1 and widths[0][1] >= 4  # "<|im_start|>user\n" ran once, at batch size 1
        full_texts, full_first = generate_with_first_logprobs(model, tok, prompts, max_new_tokens=4, batch_size=2,
                                                              intervention=intervention, share_prefix=False)
        assert texts == full_texts and torch.allclose(first, full_first, atol=1e-5)
    hook.remove()


def test_a_sliding_window_shorter_than_the_rows_turns_prefix_sharing_off(tiny_tokenizer):
    """[prefix | pads | rest] puts pads inside a row; a sliding window counts them, so a shared
    prefix changed Gemma-2's outputs (window 8: up to 0.04 in first-step log-prob)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from refusal_atlas.lm.modeling import sliding_window

    tok = tiny_tokenizer
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                       max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, attn_implementation="eager")
    model = Gemma2ForCausalLM(cfg).eval()
    assert sliding_window(model) == 8
    prompts = ["Yo", "A much longer prompt about gardening in spring, with several clauses and commas.", *PROMPTS]
    shared = generate_with_first_logprobs(model, tok, prompts, max_new_tokens=4, batch_size=2)
    alone = generate_with_first_logprobs(model, tok, prompts, max_new_tokens=4, batch_size=2, share_prefix=False)
    assert shared[0] == alone[0] and torch.allclose(shared[1], alone[1], atol=1e-5)
    one = generate_with_first_logprobs(model, tok, prompts[:2], max_new_tokens=4, batch_size=1)
    assert one[0] == alone[0][:2] and torch.allclose(one[1], alone[1][:2], atol=1e-4)
