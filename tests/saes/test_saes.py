"""SAE activations, TopK training with SAELens, the saved format and quality measures."""

import pytest
import torch
from sae_lens import SAE

from refusal_atlas.lm.modeling import decoder_layers, encode_chat, special_token_mask
from refusal_atlas.saes.corpus import token_resid_post
from refusal_atlas.saes.loading import hook_layer, load_pretrained_sae
from refusal_atlas.saes.quality import ce_losses, reconstruction_stats
from refusal_atlas.saes.training import TopKTrainConfig, train_topk_sae

PROMPTS = ["Write a haiku about rain.", "Hi", "Explain photosynthesis to a child in two sentences."]


def test_token_activations_skip_special_tokens_and_align_layers(tiny):
    model, tok = tiny
    acts = token_resid_post(model, tok, PROMPTS, [0, 2], batch_size=2, dtype=torch.float32)
    enc = encode_chat(tok, PROMPTS)
    real = enc["attention_mask"].bool() & ~special_token_mask(tok, enc["input_ids"])
    assert acts[0].shape == acts[2].shape == (int(real.sum()), 64)
    # the rows are the non-special positions in prompt order, whatever the batching
    seen = []
    handle = decoder_layers(model)[2].register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    for p in PROMPTS:
        e = encode_chat(tok, [p])
        with torch.no_grad():
            model(**e)
        seen[-1] = seen[-1][0][~special_token_mask(tok, e["input_ids"][0])]
    handle.remove()
    assert torch.allclose(acts[2], torch.cat(seen), atol=1e-4)


def _sparse_data(n=60_000, d=32, n_atoms=96, k=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=gen), dim=-1)
    idx = torch.stack([torch.randperm(n_atoms, generator=gen)[:k] for _ in range(n)])
    coef = torch.rand(n, k, generator=gen) * 4 + 1
    return (coef[..., None] * atoms[idx]).sum(1) + 0.5


def test_topk_training_recovers_sparse_data_and_saves_a_sae_lens_directory(tmp_path):
    data = _sparse_data()
    train, heldout = data[:55_000], data[55_000:]
    cfg = TopKTrainConfig(d_sae=128, k=8, lr=3e-3, batch_size=512, training_tokens=300_000, dead_feature_window=20)
    sae = train_topk_sae(train, cfg, {"hook_name": "blocks.3.hook_resid_post"})
    stats = reconstruction_stats(sae, heldout)
    assert stats["explained_variance"] > 0.85
    assert stats["l0"] <= 8 and 0 <= stats["dead_fraction"] < 0.5
    sae.save_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert hook_layer(loaded) == 3
    assert torch.allclose(loaded.encode(heldout[:50]), sae.encode(heldout[:50]))


def test_one_training_step_explains_little():
    data = _sparse_data(n=5000)
    cfg = TopKTrainConfig(d_sae=128, k=8, batch_size=512, training_tokens=512)
    sae = train_topk_sae(data, cfg, {"hook_name": "blocks.0.hook_resid_post"})
    assert reconstruction_stats(sae, data)["explained_variance"] < 0.5


def test_ce_losses_match_hf_loss_and_the_splices_act(tiny):
    model, tok = tiny
    acts = token_resid_post(model, tok, PROMPTS * 20, [1], dtype=torch.float32)[1]
    cfg = TopKTrainConfig(d_sae=64, k=8, lr=3e-3, batch_size=256, training_tokens=5_000, dead_feature_window=20)
    sae = train_topk_sae(acts, cfg, {"hook_name": "blocks.1.hook_resid_post"})
    ce, n = ce_losses(model, tok, sae, 1, PROMPTS[2:])
    enc = encode_chat(tok, PROMPTS[2:])
    with torch.no_grad():
        hf = model(**enc, labels=enc["input_ids"]).loss.item()
    assert n == enc["input_ids"].shape[1] - 1
    assert ce["clean"] == pytest.approx(hf, rel=1e-5)
    assert abs(ce["spliced"] - ce["clean"]) > 1e-4 and abs(ce["zero"] - ce["clean"]) > 1e-4


def test_hook_layer_refuses_other_hooks():
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=2))
    sae.cfg.metadata.hook_name = "blocks.4.attn.hook_z"
    with pytest.raises(ValueError, match="resid_post"):
        hook_layer(sae)


def test_unknown_pretrained_release_or_id_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown SAELens release"):
        load_pretrained_sae("no-such-release", "layer_0")
    with pytest.raises(ValueError, match="has no SAE"):
        load_pretrained_sae("gemma-scope-2b-pt-res-canonical", "layer_999/width_65k/canonical")
