"""The SAE clamp and steered generation on a tiny random chat model with SAELens SAEs."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PROMPTS, random_sae
from sae_lens import StandardSAE, StandardSAEConfig

from refusal_atlas.lm.generation import generate
from refusal_atlas.lm.interventions import _replace_output
from refusal_atlas.lm.modeling import LayerGrab, block_hidden, decoder_layers, encode_chat, last_token_logits
from refusal_atlas.steering.clamp import (
    FeatureClamp,
    FeatureSet,
    PinnedFeatureClamp,
    feature_set,
    random_feature_set,
    stable_shard,
)
from refusal_atlas.steering.conditions import clamp_name, format_number, parse_condition


@pytest.fixture
def clamp_setup(tiny):
    model, tok = tiny
    d = model.config.hidden_size
    saes = {l: random_sae(d, 96, 8, l, seed=l, dtype="float32") for l in (1, 2)}
    return model, tok, saes


def global_set(saes, picks: dict[int, list[int]]) -> FeatureSet:
    masks = {l: torch.zeros(1, s.cfg.d_sae, dtype=torch.bool) for l, s in saes.items()}
    scale = {l: torch.zeros(1, s.cfg.d_sae) for l, s in saes.items()}
    for l, feats in picks.items():
        masks[l][0, feats] = True
        scale[l][0, feats] = 2.0
    return FeatureSet(masks, scale)


def test_condition_names_round_trip_and_reject_unknowns():
    assert parse_condition("base").kind == "base" and parse_condition("as").kind == "ablate"
    c = parse_condition("random-local-transductive-k10-xm3")
    assert (c.selector, c.scope, c.protocol, c.k_star, c.mode, c.value) == ("random", "local", "transductive", 10,
                                                                            "multiply", -3.0)
    assert parse_condition("la_ig-global-heldout-s0p5").value == 0.5
    assert parse_condition("la_ig-global-heldout-s2").labels == ("harmless",)
    assert clamp_name("ap", "global", "heldout", 5, "multiply", -2.5) == "ap-global-heldout-k5-xm2p5"
    assert format_number(-0.25) == "m0p25"
    for bad in ("la_ig", "la_ig-global", "pca-global-heldout", "la_ig-global-heldout-x3.0", "AS"):
        with pytest.raises(ValueError, match="unknown steering condition"):
            parse_condition(bad)


@torch.no_grad()
def test_clamp_with_c_one_is_exactly_no_intervention(clamp_setup):
    model, tok, saes = clamp_setup
    enc = encode_chat(tok, PROMPTS)
    ref = model(**enc).logits
    clamp = FeatureClamp(saes, global_set(saes, {1: [0, 5, 7], 2: list(range(40))}), mode="multiply", value=1.0)
    with clamp.applied(model):
        out = model(**enc).logits
    assert torch.equal(out, ref)  # the error term is kept, so nothing moves
    assert clamp.calls == {1: 1, 2: 1}
    base = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=2)
    assert generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=2, intervention=clamp) == base
    # and a real clamp does move the output
    strong = FeatureClamp(saes, global_set(saes, {1: list(range(96)), 2: list(range(96))}), value=-5.0)
    with strong.applied(model):
        assert not torch.allclose(model(**enc).logits, ref)


@torch.no_grad()
def test_hook_fires_at_every_generated_step(clamp_setup):
    model, tok, saes = clamp_setup
    clamp = FeatureClamp(saes, global_set(saes, {1: [3]}), value=0.0)
    lengths = []

    def record(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        lengths.append(hidden.shape[1])

    handle = decoder_layers(model)[1].register_forward_pre_hook(record, with_kwargs=True)
    try:
        enc = encode_chat(tok, PROMPTS[:2])
        with clamp.applied(model):
            seqs = model.generate(**enc, max_new_tokens=7, do_sample=False, eos_token_id=None,
                                  pad_token_id=tok.pad_token_id)
    finally:
        handle.remove()
    n_new = seqs.shape[1] - enc["input_ids"].shape[1]
    assert n_new == 7
    # one prefill over the prompt, then one cached step per further token, each through the hook
    assert lengths == [enc["input_ids"].shape[1]] + [1] * (n_new - 1)
    assert clamp.calls[1] == n_new


@torch.no_grad()
def test_set_mode_writes_the_target_and_reencoding_recovers_it(tiny):
    """With an orthogonal ReLU SAE (W_enc = W_decᵀ), E(h + D(f') − D(f)) = f' exactly where f > 0."""
    model, tok = tiny
    d = model.config.hidden_size
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=d, dtype="float64"))
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    sae.W_dec.copy_(q)
    sae.W_enc.copy_(q.T)
    sae.b_enc.fill_(5.0)  # every latent fires, so re-encoding is linear
    sae.b_dec.zero_()
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    model = model.double()
    fs = global_set({1: sae}, {1: [2, 9]})
    clamp = FeatureClamp({1: sae}, fs, mode="set", value=3.0, record=True)
    seen = {}

    def keep(_module, _inputs, output):
        seen["h"] = block_hidden(output).clone()

    enc = encode_chat(tok, PROMPTS[:3])
    with clamp.applied(model):
        handle = decoder_layers(model)[1].register_forward_hook(keep)  # after the clamp's hook
        try:
            model(**enc)
        finally:
            handle.remove()
    steered = seen["h"]
    handle = decoder_layers(model)[1].register_forward_hook(keep)
    try:
        model(**enc)
    finally:
        handle.remove()
    target = 3.0 * 2.0  # value times the feature's scale
    assert torch.all(clamp.last[1][..., [2, 9]] == target)
    assert torch.allclose(sae.encode(steered)[..., [2, 9]], torch.full_like(steered[..., :2], target), atol=1e-9)
    others = [i for i in range(d) if i not in (2, 9)]
    assert torch.allclose(sae.encode(steered)[..., others], sae.encode(seen["h"])[..., others], atol=1e-9)


@torch.no_grad()
def test_local_sets_follow_each_prompt_through_batching(clamp_setup):
    model, tok, saes = clamp_setup
    ids = [f"p{i}" for i in range(len(PROMPTS))]
    rng = np.random.default_rng(0)
    rows = []
    for pid in ids:
        for rank, f in enumerate(rng.choice(96, size=4, replace=False), start=1):
            rows.append({"protocol": "heldout", "scope": "local", "prompt_id": pid, "rank": rank,
                         "layer": [1, 2][rank % 2], "feature": int(f), "max_act_harmful": 1.0})
    table = pd.DataFrame(rows)
    local = feature_set(table, "heldout", "local", 4, {1: 96, 2: 96})
    batched = generate(model, tok, PROMPTS, max_new_tokens=5, batch_size=3,
                       intervention=FeatureClamp(saes, local, value=-8.0), prompt_ids=ids)
    for i, pid in enumerate(ids):
        one = table[table.prompt_id == pid].assign(scope="global", prompt_id=None)
        glob = feature_set(one, "heldout", "global", 4, {1: 96, 2: 96})
        alone = generate(model, tok, [PROMPTS[i]], max_new_tokens=5, batch_size=1,
                         intervention=FeatureClamp(saes, glob, value=-8.0))
        assert alone[0] == batched[i]
    with pytest.raises(ValueError, match="no local feature set"):
        local.rows_for(["unknown"])
    with pytest.raises(RuntimeError, match="rows"):
        with FeatureClamp(saes, local, value=-8.0).applied(model):
            model(**encode_chat(tok, PROMPTS[:2]))


def test_feature_sets_are_top_k_prefixes_and_random_control_matches_sizes():
    rows = [{"protocol": "heldout", "scope": "global", "prompt_id": None, "rank": r, "layer": l, "feature": f,
             "max_act_harmful": 0.5 * r}
            for r, (l, f) in enumerate([(1, 4), (2, 7), (1, 9), (2, 1), (2, 3)], start=1)]
    table = pd.DataFrame(rows)
    top3 = feature_set(table, "heldout", "global", 3, {1: 16, 2: 16})
    assert torch.nonzero(top3.masks[1][0]).flatten().tolist() == [4, 9]
    assert torch.nonzero(top3.masks[2][0]).flatten().tolist() == [7]
    assert top3.scale[1][0, 9] == 1.5 and top3.size == 3
    with pytest.raises(ValueError, match="larger than the selected sets"):
        feature_set(table, "heldout", "global", 6, {1: 16, 2: 16})
    with pytest.raises(ValueError, match="no local heldout"):
        feature_set(table, "heldout", "local", 3, {1: 16, 2: 16})
    live = {1: torch.arange(16) < 12, 2: torch.arange(16) % 2 == 1}
    scale = {1: torch.ones(16), 2: torch.ones(16)}
    rnd = random_feature_set(top3, live, scale, seed=0)
    for l in (1, 2):
        picked = rnd.masks[l][0]
        assert int(picked.sum()) == int(top3.masks[l][0].sum())
        assert not (picked & top3.masks[l][0]).any() and not (picked & ~live[l]).any()
    assert torch.equal(random_feature_set(top3, live, scale, seed=0).masks[1], rnd.masks[1])


def test_shards_partition_prompts_stably():
    ids = [f"id-{i}" for i in range(200)]
    shard = stable_shard(ids, 4)
    assert set(shard) == {0, 1, 2, 3} and min(np.bincount(shard)) > 30
    assert list(stable_shard(ids[:50], 4)) == list(shard[:50])  # a grown set moves no prompt



def test_a_pinned_clamp_holds_the_other_set_at_its_clean_values(tiny):
    """Yeo et al.'s §4.2 clamp as their code runs it: f = E(h), f[A] *= c, f[B] = clean f[B],
    h <- D(f) + (h - D(E(h))) at every SAE layer, written out here by hand in float64."""
    model, tok = tiny
    model = model.double()
    d = model.config.hidden_size
    layers = range(model.config.num_hidden_layers)
    saes = {l: random_sae(d, 96, 8, l, seed=l) for l in layers}
    clamped = global_set(saes, {0: [3, 5], 1: [7, 11]})
    pinned = global_set(saes, {1: [2, 4, 6], 2: [1, 8], 3: [9]})
    pinned.masks = {l: m for l, m in pinned.masks.items() if l in (1, 2, 3)}
    ids = [f"p{i}" for i in range(len(PROMPTS))]
    enc = encode_chat(tok, PROMPTS)
    with torch.no_grad(), LayerGrab(model, list(layers)) as grab:
        last_token_logits(model, enc)
    clean = {l: saes[l].encode(grab.out[l]) for l in layers}

    def by_hand(pin: bool):
        def fn(l):
            def edit(h):
                f = saes[l].encode(h)
                res = h - saes[l].decode(f)
                a, b = clamped.masks[l][0], pinned.masks.get(l, torch.zeros_like(clamped.masks[l]))[0]
                f = torch.where(a, -4.0 * f, f)
                if pin:
                    f = torch.where(b, clean[l], f)
                return saes[l].decode(f) + res
            return edit
        handles = [decoder_layers(model)[l].register_forward_hook(_replace_output(fn(l))) for l in layers]
        try:
            with torch.no_grad():
                return last_token_logits(model, enc)
        finally:
            for h in handles:
                h.remove()

    pc = PinnedFeatureClamp(saes, clamped, value=-4.0, record=True, pinned=pinned)
    pc.record_clean(model, tok, PROMPTS, ids, batch_size=3)  # other batches, other padding
    with pc.applied(model), pc.rows(ids), torch.no_grad():
        ours = last_token_logits(model, enc)
    assert torch.allclose(ours, by_hand(pin=True), atol=1e-9)
    assert not torch.allclose(ours, by_hand(pin=False), atol=1e-3)  # the pin matters downstream
    real = enc["attention_mask"].bool()
    for l, pin in ((1, [2, 4, 6]), (2, [1, 8]), (3, [9])):
        assert torch.allclose(pc.last[l][..., pin][real], clean[l][..., pin][real], atol=1e-9)
    # unpinned, the clamp upstream moves those latents (empty sets on 2 and 3 only record them)
    free = FeatureClamp(saes, global_set(saes, {0: [3, 5], 1: [7, 11], 2: [], 3: []}), value=-4.0, record=True)
    with free.applied(model), torch.no_grad():
        last_token_logits(model, enc)
    assert not torch.allclose(free.last[2][..., [1, 8]][real], clean[2][..., [1, 8]][real], atol=1e-3)
    # generation: each row's clean values line up with its prompt whatever the batch
    batched = generate(model, tok, PROMPTS, max_new_tokens=4, batch_size=3, intervention=pc, prompt_ids=ids)
    for i in (0, len(PROMPTS) - 1):
        alone = generate(model, tok, [PROMPTS[i]], max_new_tokens=4, batch_size=1, intervention=pc,
                         prompt_ids=[ids[i]])
        assert alone[0] == batched[i]
    with pytest.raises(ValueError, match="share latents"):
        PinnedFeatureClamp(saes, clamped, value=-4.0, pinned=global_set(saes, {1: [7]}))
