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


def _saved_jumprelu(tmp_path, layer, d_in=64):
    from refusal_atlas.testing.synthetic import random_saes

    path = tmp_path / f"layer_{layer}"
    random_saes(d_in, 96, [layer], "cpu", torch.float32, kind="jumprelu")[layer].save_model(path)
    return path


def test_a_local_sae_is_a_checked_copy_and_a_misfit_names_the_sae_and_the_model(tmp_path):
    from refusal_atlas.pipeline.saes import local_sae

    src = _saved_jumprelu(tmp_path / "src", 2)
    local_sae(sae_dir=str(src), spec={"dtype": "float32"}, d_model=64, layer=2, model_name="m",
              output_dir=str(tmp_path / "out"))
    copy = SAE.load_from_disk(str(tmp_path / "out"))
    assert copy.cfg.architecture() == "jumprelu" and hook_layer(copy) == 2
    assert torch.equal(copy.W_dec, SAE.load_from_disk(str(src)).W_dec)
    with pytest.raises(ValueError, match=r"SAE .*layer_2 reads layer 2 .*configured for layer 3 of model m"):
        local_sae(sae_dir=str(src), spec={"dtype": "float32"}, d_model=64, layer=3, model_name="m",
                  output_dir=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"d_in 64, but model m's residual stream is 2304 wide"):
        local_sae(sae_dir=str(src), spec={"dtype": "float32"}, d_model=2304, layer=2, model_name="m",
                  output_dir=str(tmp_path / "bad"))
    with pytest.raises(FileNotFoundError, match="not a SAELens SAE directory"):
        local_sae(sae_dir=str(tmp_path), spec={"dtype": "float32"}, d_model=64, layer=2, model_name="m",
                  output_dir=str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def _gemma_scope_files(folder, d_in, d_sae, layer):
    import numpy as np

    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", W_enc=np.full((d_in, d_sae), 0.01, np.float32),
             W_dec=np.full((d_sae, d_in), 0.01, np.float32), b_enc=np.zeros(d_sae, np.float32),
             b_dec=np.zeros(d_in, np.float32), threshold=np.full(d_sae, 0.05, np.float32))


def _llama_scope_files(folder, d_in, d_sae, layer):
    import json

    from safetensors.torch import save_file

    (folder / "checkpoints").mkdir(parents=True)
    (folder / "hyperparams.json").write_text(json.dumps({
        "d_model": d_in, "d_sae": d_sae, "hook_point_in": f"blocks.{layer}.hook_resid_post",
        "hook_point_out": f"blocks.{layer}.hook_resid_post", "jump_relu_threshold": 0.05,
        "dataset_average_activation_norm": {"in": 50.0, "out": 50.0}, "act_fn": "jumprelu"}))
    save_file({"encoder.weight": torch.full((d_sae, d_in), 0.01, dtype=torch.bfloat16),
               "encoder.bias": torch.zeros(d_sae, dtype=torch.bfloat16),
               "decoder.weight": torch.full((d_in, d_sae), 0.01, dtype=torch.bfloat16),
               "decoder.bias": torch.zeros(d_in, dtype=torch.bfloat16)},
              str(folder / "checkpoints/final.safetensors"))


# (release, sae_id, layer, model, d_in, d_sae, the release's file layout, another model's width).
# Gemma Scope at its real width; Llama Scope at its real d_in with fewer latents, to keep the
# test's files small (the loader reads d_sae from hyperparams.json either way).
RELEASES = {
    "gemma-scope": ("gemma-scope-2b-pt-res-canonical", "layer_{layer}/width_16k/canonical", 5, "gemma-2-2b-it",
                    2304, 16384, _gemma_scope_files, 3584),
    "llama-scope": ("llama_scope_lxr_8x", "l{layer}r_8x", 11, "llama-3.1-8b-instruct", 4096, 256,
                    _llama_scope_files, 2304),
}


@pytest.mark.parametrize("form", sorted(RELEASES))
def test_a_release_sae_loads_through_sae_lens_from_an_offline_hub_cache(form, tmp_path):
    """SAE.from_pretrained's real path (release directory, hf_hub_download, the release's own
    conversion) against a Hugging Face cache laid out as the hub lays it, with the hub offline.
    The weights are random, in the files and form each release publishes."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release, sae_id, layer, model, d_in, d_sae, write_files, other_width = RELEASES[form]
    entry = get_pretrained_saes_directory()[release]
    commit = "0" * 40
    repo = tmp_path / "hub" / ("models--" + entry.repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text(commit)
    write_files(repo / "snapshots" / commit / entry.saes_map[sae_id.format(layer=layer)], d_in, d_sae, layer)
    code = ("import sys; from refusal_atlas.pipeline.saes import pretrained_sae\n"
            "pretrained_sae(spec={'dtype': 'float32'}, cfg={'release': sys.argv[1], 'sae_id': sys.argv[2], "
            "'d_model': int(sys.argv[3])}, layer=int(sys.argv[4]), model_name=sys.argv[5], output_dir=sys.argv[6])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "PYTHONPATH": str(ROOT / "src")}
    run = lambda d_model, out: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, release, sae_id, str(d_model), str(layer), model, str(tmp_path / out)],
        capture_output=True, text=True, env=env)
    res = run(d_in, "out")
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = json.loads((tmp_path / "out/cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"]) == ("jumprelu", d_in, d_sae)
    assert cfg["metadata"]["hook_name"] == f"blocks.{layer}.hook_resid_post"
    res = run(other_width, "bad")  # the release is for another model
    assert res.returncode != 0 and f"d_in {d_in}, but model {model}'s residual stream is {other_width}" in res.stderr
    assert not (tmp_path / "bad").exists()
