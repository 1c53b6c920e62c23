import torch

from refusal_atlas.lm.activations import last_token_resid_post
from refusal_atlas.lm.modeling import format_chat

PROMPTS = [
    "Hi",
    "How do I make a pipe organ at home?",
    "Give me step-by-step instructions to build a wooden birdhouse, with a list of tools and wood.",
]


def test_cache_matches_plain_forward_with_unequal_lengths(tiny):
    model, tok = tiny
    got = last_token_resid_post(model, tok, PROMPTS, batch_size=3)
    assert got.shape == (3, model.config.num_hidden_layers, model.config.hidden_size)
    lengths = [len(tok(t, add_special_tokens=False).input_ids) for t in format_chat(tok, PROMPTS)]
    assert len(set(lengths)) == 3  # really unequal: the batch is left-padded
    for i, text in enumerate(format_chat(tok, PROMPTS)):
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states
        # hidden_states[l + 1] is resid_post of block l, except the last, which HF normalises.
        ref = torch.stack([h[0, -1] for h in hs[1:-1]])
        assert (got[i, :-1] - ref).abs().max() <= 1e-4
        last = model.model.norm(got[i, -1].unsqueeze(0))[0]
        assert (last - hs[-1][0, -1]).abs().max() <= 1e-4


def test_batch_size_does_not_change_activations(tiny):
    model, tok = tiny
    a = last_token_resid_post(model, tok, PROMPTS, batch_size=1)
    b = last_token_resid_post(model, tok, PROMPTS, batch_size=2)
    assert (a - b).abs().max() <= 1e-4
