"""Every chat family the configs name, as a tiny random model with the family's own template, through
the library's model-facing functions: chat formatting and its system-prompt rule, end-of-turn
stopping, the config checks, prefix-shared generation, activations, directional ablation, LA-IG
through JumpReLU SAEs (Gemma Scope's form) and the feature clamp."""

import pytest
import torch
from conftest import PROMPTS

from refusal_atlas.config.model_checks import check_models, model_facts
from refusal_atlas.config.schema import ConfigError
from refusal_atlas.features.attribution import la_ig_batch
from refusal_atlas.lm.activations import final_positions_resid_post, last_token_resid_post
from refusal_atlas.lm.generation import generate_with_first_logprobs
from refusal_atlas.lm.interventions import DirectionalAblation
from refusal_atlas.lm.modeling import (
    encode_chat,
    end_of_turn_id,
    end_of_turn_ids,
    format_chat,
    load_model,
    post_instruction_length,
    template_header_length,
)
from refusal_atlas.lm.sources import ModelSourceError, prepare_model
from refusal_atlas.steering.clamp import FeatureClamp, FeatureSet
from refusal_atlas.testing.families import FAMILIES, save_tiny_chat_model
from refusal_atlas.testing.synthetic import random_saes

CORPUS = [*PROMPTS, "I cannot help with that.", "Sure, here is how.", "Be brief."]
# what each family's template must show around one user turn
MARKERS = {
    "chatml-llama": ("<|im_start|>user\nHi<|im_end|>\n", "<|im_start|>assistant\n"),
    "gemma2": ("<bos><start_of_turn>user\nHi<end_of_turn>\n", "<start_of_turn>model\n"),
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date",
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant"),
    "qwen2": ("<|im_start|>system\nYou are Qwen", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    "mistral": ("<s>[INST] Hi[/INST]", "[INST] Hi[/INST]"),
}
# the fixed header before the user turn (the reference's num_bos_token), and what follows it
HEADERS = {
    "chatml-llama": ("<|im_start|>", "user\n"),
    "gemma2": ("<bos>", "<start_of_turn>user\n"),
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
               "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>", "<|start_header_id|>user"),
    "qwen2": ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
              "<|im_end|>\n", "<|im_start|>user\n"),
    "mistral": ("<s>", "[INST] Hi"),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    family = FAMILIES[request.param]
    path = save_tiny_chat_model(family, tmp_path_factory.mktemp(family.name), CORPUS)
    return family, path


@pytest.fixture(scope="module")
def loaded(family_dir):
    family, path = family_dir
    model, tok = load_model(path)
    return family, model, tok


def test_the_template_is_the_family_s_and_so_is_its_system_prompt_rule(loaded):
    family, _, tok = loaded
    [plain] = format_chat(tok, ["Hi"])
    for marker in MARKERS[family.name]:
        assert marker in plain, (family.name, plain)
    if family.system == "none":
        with pytest.raises(ValueError, match="rejects a system prompt.*System role not supported"):
            format_chat(tok, ["Hi"], "Be brief.")
        return
    [with_system] = format_chat(tok, ["Hi"], "Be brief.")
    assert "Be brief." in with_system
    if family.system == "folded":  # Mistral joins it to the user turn
        assert "[INST] Be brief.\n\nHi[/INST]" in with_system


def test_the_template_header_is_read_from_the_template(loaded):
    family, _, tok = loaded
    [plain] = format_chat(tok, ["Hi"])
    ids = tok(plain, add_special_tokens=False).input_ids
    n = template_header_length(tok)
    head, rest = HEADERS[family.name]
    assert tok.decode(ids[:n]) == head and tok.decode(ids[n:]).startswith(rest)
    if family.system == "own":  # a system prompt joins the header, so it cannot be a constant
        [with_system] = format_chat(tok, ["Hi"], "Be brief.")
        n_sys = template_header_length(tok, "Be brief.")
        decoded = tok.decode(tok(with_system, add_special_tokens=False).input_ids[:n_sys])
        assert decoded.endswith(("Be brief.<|im_end|>\n", "Be brief.<|eot_id|>"))


# what each family's template writes after the user's instruction (Arditi et al.'s positions)
POST_INSTRUCTION = {
    "chatml-llama": "<|im_end|>\n<|im_start|>assistant\n",
    "gemma2": "<end_of_turn>\n<start_of_turn>model\n",
    "llama3": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2": "<|im_end|>\n<|im_start|>assistant\n",
    "mistral": "[/INST]",
}


def test_the_post_instruction_positions_are_read_from_the_template(loaded):
    family, model, tok = loaded
    n = post_instruction_length(tok)
    prompts = format_chat(tok, PROMPTS[:3])
    for p in prompts:
        ids = tok(p, add_special_tokens=False).input_ids
        assert tok.decode(ids[-n:]) == POST_INSTRUCTION[family.name], family.name
    # the activations at those positions, batched and left-padded, are each prompt's own
    acts = final_positions_resid_post(model, tok, PROMPTS[:3], n, batch_size=3)
    assert acts.shape == (3, n, 4, 64)
    for i, prompt in enumerate(PROMPTS[:3]):
        alone = final_positions_resid_post(model, tok, [prompt], n, batch_size=1)[0]
        assert torch.allclose(acts[i], alone, atol=1e-4)
    assert torch.equal(acts[:, -1], last_token_resid_post(model, tok, PROMPTS[:3], batch_size=3))


def test_generation_stops_on_the_family_s_end_of_turn(loaded):
    family, _, tok = loaded
    eot = tok.convert_tokens_to_ids(family.end_of_turn)
    assert end_of_turn_id(tok) == eot and eot in end_of_turn_ids(tok)
    if family.name == "llama3":  # a tool-calling turn ends on <|eom_id|>
        assert tok.convert_tokens_to_ids("<|eom_id|>") in end_of_turn_ids(tok)


def test_the_config_checks_read_depth_width_and_system_role_from_the_directory(family_dir):
    family, path = family_dir
    facts = model_facts("m", {"source": "local", "path": str(path)})
    assert (facts.n_layers, facts.d_model, facts.chat_template) == (4, 64, True)
    assert facts.system_role is (family.system != "none")
    config = {"models": {"m": {"source": "local", "path": str(path), "system_prompt": "Be brief.",
                               "refusal_tune": False, "sae": {"source": "train", "layers": [1]}}},
              "probes": {"harm": {"layers": None}}, "direction": {"layer": None},
              "sae_corpus": {"dataset": "d"}, "promptsets": {}}
    if family.system == "none":
        with pytest.raises(ConfigError, match="models.m.system_prompt: .*no system role"):
            check_models(config, {"d"}, {"m": facts})
    else:
        check_models(config, {"d"}, {"m": facts})


def test_prepare_model_refuses_a_system_prompt_the_template_rejects(family_dir, tmp_path):
    family, path = family_dir
    spec = {"source": "local", "path": str(path), "system_prompt": "Be brief.", "dtype": "float32"}
    if family.system != "none":
        assert (prepare_model(spec, tmp_path / "out") / "config.json").is_file()
        return
    with pytest.raises(ModelSourceError, match="system_prompt: .*rejects a system prompt"):
        prepare_model(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prefix_shared_generation_equals_full_prefills(loaded):
    """The shared chat header is computed once only where that cannot change a row (Gemma-2's
    sliding window turns it off); either way the texts and first-step log-probs are the same."""
    _, model, tok = loaded
    prompts = ["Yo", "A much longer prompt about gardening in spring, with several clauses.", *PROMPTS]
    shared = generate_with_first_logprobs(model, tok, prompts, max_new_tokens=4, batch_size=2)
    full = generate_with_first_logprobs(model, tok, prompts, max_new_tokens=4, batch_size=2, share_prefix=False)
    assert shared[0] == full[0] and torch.allclose(shared[1], full[1], atol=1e-5)
    if not model.config.tie_word_embeddings:  # a random tied model repeats the prompt's last newline
        assert sum(bool(t.strip()) for t in full[0]) >= len(prompts) // 2  # text, not only special tokens


def test_direction_ablation_la_ig_and_clamp_run_on_jumprelu_saes(loaded):
    _, model, tok = loaded
    acts = last_token_resid_post(model, tok, PROMPTS, batch_size=2)
    assert acts.shape == (len(PROMPTS), 4, 64) and torch.isfinite(acts).all()
    r = acts[:2, 2].mean(0) - acts[2:, 2].mean(0)
    enc = encode_chat(tok, PROMPTS)
    saes = random_saes(64, 96, [1, 2], "cpu", torch.float32, kind="jumprelu")
    for sae in saes.values():  # thresholds below the pre-activations' scale, so latents fire
        sae.threshold.data.fill_(0.01)
    refusal_id = tok("I", add_special_tokens=False).input_ids[0]
    b = la_ig_batch(model, saes, enc, r, refusal_id, steps=4)
    assert b.scores.shape == (len(PROMPTS), 2, 96) and torch.isfinite(b.scores).all()
    assert (b.m_patch != b.m_clean).all()  # ablating r moves the metric on every prompt
    top = {l: b.scores[:, i].mean(0).abs().topk(3).indices for i, l in enumerate(b.layers)}
    masks = {l: torch.zeros(1, 96, dtype=torch.bool).index_fill_(1, idx, True) for l, idx in top.items()}
    clamp = FeatureClamp(saes, FeatureSet(masks, {l: torch.ones(1, 96) for l in masks}), mode="multiply",
                         value=-3.0, record=True)
    plain = generate_with_first_logprobs(model, tok, PROMPTS, max_new_tokens=3, batch_size=2)
    clamped = generate_with_first_logprobs(model, tok, PROMPTS, max_new_tokens=3, batch_size=2, intervention=clamp)
    assert clamp.calls and not torch.allclose(plain[1], clamped[1])
    ablated = generate_with_first_logprobs(model, tok, PROMPTS, max_new_tokens=3, batch_size=2,
                                           intervention=DirectionalAblation(r))
    assert not torch.allclose(plain[1], ablated[1])
