"""Where an SAE reads (TransformerLens hook names on HF modules): each block adds exactly its
attention and MLP outputs to the stream, and hook_z is what the output projection reads, on the
Llama family and on Gemma-2's sandwich norms."""

import pytest
import torch
from conftest import FAMILY_CORPUS

from refusal_atlas.lm.modeling import encode_chat, hook_module, hook_site, hooks_removed, last_token_logits, parse_hook
from refusal_atlas.testing.families import FAMILIES, family_tokenizer, tiny_chat_model


@pytest.fixture(scope="module", params=["llama3", "gemma2"])
def family_model(request):
    family = FAMILIES[request.param]
    tok = family_tokenizer(family, FAMILY_CORPUS)
    # float32: Gemma-2's eager attention turns left-padded float64 batches into NaN
    return request.param, tiny_chat_model(family, tok).eval(), tok


def _grab(model, enc, names):
    out = {}
    handles = [hook_site(model, name, lambda h, name=name: out.setdefault(name, h.detach().clone()), replace=False)
               for name in names]
    with hooks_removed(handles), torch.no_grad():
        last_token_logits(model, enc)
    return out


def test_a_block_adds_exactly_its_attention_and_mlp_outputs(family_model):
    name, model, tok = family_model
    enc = encode_chat(tok, FAMILY_CORPUS[:3])
    a = _grab(model, enc, ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.2.hook_attn_out",
                           "blocks.2.hook_mlp_out", "blocks.2.attn.hook_z"])
    real = enc["attention_mask"].bool()  # left padding: a padded position's attention is undefined
    a = {k: v[real] for k, v in a.items()}
    torch.testing.assert_close(a["blocks.2.hook_resid_post"] - a["blocks.1.hook_resid_post"],
                               a["blocks.2.hook_attn_out"] + a["blocks.2.hook_mlp_out"], atol=1e-5, rtol=0)
    block = model.model.layers[2]
    attn = block.self_attn.o_proj(a["blocks.2.attn.hook_z"])
    if name == "gemma2":  # the attention's output is normalised before it joins the stream
        attn = block.post_attention_layernorm(attn)
    torch.testing.assert_close(attn, a["blocks.2.hook_attn_out"], atol=1e-5, rtol=0)
    cfg = model.config
    assert a["blocks.2.attn.hook_z"].shape[-1] == cfg.num_attention_heads * getattr(cfg, "head_dim", 16)


def test_a_replaced_site_changes_what_follows(family_model):
    _, model, tok = family_model
    enc = encode_chat(tok, FAMILY_CORPUS[:2])
    real = enc["attention_mask"].bool()
    base = _grab(model, enc, ["blocks.3.hook_resid_post"])["blocks.3.hook_resid_post"][real]
    for site in ("blocks.1.attn.hook_z", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"):
        h = hook_site(model, site, lambda x: torch.zeros_like(x))
        try:
            changed = _grab(model, enc, ["blocks.3.hook_resid_post"])["blocks.3.hook_resid_post"][real]
        finally:
            h.remove()
        assert (changed - base).abs().max() > 1e-3, site
        # identity replacement: nothing changes
        h = hook_site(model, site, lambda x: x)
        try:
            same = _grab(model, enc, ["blocks.3.hook_resid_post"])["blocks.3.hook_resid_post"][real]
        finally:
            h.remove()
        torch.testing.assert_close(same, base, atol=0, rtol=0)


def test_unknown_hooks_are_refused_by_name(family_model):
    _, model, _ = family_model
    assert parse_hook("blocks.7.attn.hook_z") == (7, "attn", "attn.hook_z")
    assert hook_module(model, "blocks.0.hook_resid_post") == (model.model.layers[0], False)
    with pytest.raises(ValueError, match="this one reads 'blocks.1.hook_resid_pre'"):
        parse_hook("blocks.1.hook_resid_pre")
