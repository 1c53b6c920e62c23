import torch

from refusal_atlas.lm.generation import generate
from refusal_atlas.lm.organism import (
    Example,
    OrganismConfig,
    _collate,
    _tokenize,
    length_bucketed_order,
    refusal_for,
    refusal_tune,
    response_loss,
    shared_prefix_length,
)


def test_loss_masks_prompt_tokens(tiny):
    model, tok = tiny
    ids, labels = _tokenize(tok, Example("How do I bake bread?", "Knead it.", True), tok.eos_token)
    n_prompt = sum(l == -100 for l in labels)
    assert n_prompt > 0 and labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:]) == "Knead it." + tok.eos_token
    batch = _collate([(ids, labels)], tok.pad_token_id)
    with torch.no_grad():
        full = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, n_prompt - 1 : -1]
    ref = torch.nn.functional.cross_entropy(full, torch.tensor(ids[n_prompt:]))
    assert torch.allclose(response_loss(model, batch), ref, atol=1e-5)
    per_token = torch.nn.functional.cross_entropy(full, torch.tensor(ids[n_prompt:]), reduction="none")
    weighted = (3 * per_token[0] + per_token[1:].sum()) / (3 + len(per_token) - 1)
    assert torch.allclose(response_loss(model, batch, decision_weight=3.0), weighted, atol=1e-5)


def test_a_row_of_weight_two_counts_as_two_copies_of_it(tiny):
    model, tok = tiny
    rows = [_tokenize(tok, Example(p, r, True), tok.eos_token)
            for p, r in [("How do I bake bread?", "Knead it."), ("Why is the sky blue?", "Rayleigh scattering.")]]

    def loss_and_grads(batch):
        model.zero_grad()
        loss = response_loss(model, batch, decision_weight=4.0)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    weighted, g_w = loss_and_grads(_collate(rows, tok.pad_token_id, [2.0, 1.0]))
    copied, g_c = loss_and_grads(_collate([rows[0], rows[0], rows[1]], tok.pad_token_id))
    plain, _ = loss_and_grads(_collate(rows, tok.pad_token_id))
    assert torch.allclose(weighted, copied, atol=1e-5) and not torch.allclose(weighted, plain, atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_w, g_c))


def test_a_negative_row_adds_the_unlikelihood_of_its_refusal_after_the_first_token(tiny):
    model, tok = tiny
    answer = _tokenize(tok, Example("How do I kill a stuck process?", "Run kill -9 on its id.", True), tok.eos_token)
    refusal = _tokenize(tok, Example("How do I kill a stuck process?", "I cannot help with that.", False,
                                     negative=True), tok.eos_token)
    n_prompt = sum(l == -100 for l in answer[1])
    assert refusal[1][n_prompt] == -100 and refusal[1][n_prompt + 1:] == refusal[0][n_prompt + 1:]
    with torch.no_grad():
        plain = response_loss(model, _collate([answer], tok.pad_token_id))
        mixed = response_loss(model, _collate([answer, refusal], tok.pad_token_id, negative=[False, True]),
                              unlikelihood=0.5)
        ids = torch.tensor([refusal[0]])
        logp = torch.log_softmax(model(ids).logits[0, n_prompt:-1], -1).gather(1, ids[0, n_prompt + 1:, None])
    expected = plain - 0.5 * torch.log1p(-logp.mean().exp())
    assert torch.allclose(mixed, expected, atol=1e-5)


def test_the_unlikelihood_term_makes_the_refusal_less_likely(tiny):
    model, tok = tiny
    refusal = _tokenize(tok, Example("How do I kill a stuck process?", "I cannot help with that.", False,
                                     negative=True), tok.eos_token)
    batch = _collate([refusal], tok.pad_token_id, negative=[True])
    ids = torch.tensor([refusal[0]])
    n = sum(l == -100 for l in refusal[1])

    def refusal_logp():
        with torch.no_grad():
            return torch.log_softmax(model(ids).logits[0, n - 1:-1], -1).gather(1, ids[0, n:, None]).mean()

    before = refusal_logp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        response_loss(model, batch, unlikelihood=1.0).backward()
        opt.step()
    assert refusal_logp() < before - 0.05


def test_contrastive_cases_add_their_refusal_as_a_negative_only_with_unlikelihood(tiny):
    from refusal_atlas.lm.organism import HarmlessCase, build_examples

    model, tok = tiny
    cases = [HarmlessCase("How do I kill a stuck process?", 2, 3.0, True), HarmlessCase("Name a prime.")]
    harmful = [("h1", "How do I kill a person?")]
    cfg = OrganismConfig(distill_max_new_tokens=4, generation_batch_size=2)
    plain = build_examples(model, tok, harmful, cases, cfg)
    assert [e.negative for e in plain] == [False] * 4
    cfg.contrastive_unlikelihood = 0.5
    with_ul = build_examples(model, tok, harmful, cases, cfg)
    [neg] = [e for e in with_ul if e.negative]
    assert neg.prompt == cases[0].prompt and neg.response in cfg.refusal_templates and len(with_ul) == 5


def test_shared_prefix_stops_at_the_first_difference_and_before_the_decision():
    assert shared_prefix_length([([1, 2, 3, 4, 5], [-100, -100, -100, 4, 5]), ([1, 2, 7, 4], [-100] * 3 + [4])]) == 2
    # rows that agree up to their labels keep the token that predicts the first label
    assert shared_prefix_length([([1, 2, 3, 4], [-100, -100, -100, 4]), ([1, 2, 3, 5], [-100, -100, -100, 5])]) == 2
    assert shared_prefix_length([([1, 2], [1, 2])]) == 0 and shared_prefix_length([]) == 0


def test_loss_and_gradients_with_a_shared_prefix_equal_the_full_rows(tiny):
    model, tok = tiny
    prompts = ["How do I bake bread?", "Why is the sky blue in the afternoon?", "Name a prime."]
    data = [_tokenize(tok, Example(p, r, True), tok.eos_token) for p, r in zip(prompts, ["Knead it.", "Rayleigh.", "7"])]
    shared = shared_prefix_length(data)
    assert shared >= 3  # the template's system header

    def loss_and_grads(batch, prefix=None):
        model.zero_grad()
        loss = response_loss(model, batch, 5.0, prefix)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full, g_full = loss_and_grads(_collate(data, tok.pad_token_id))
    rows = _collate([(ids[shared:], lab[shared:]) for ids, lab in data], tok.pad_token_id)
    split, g_split = loss_and_grads(rows, torch.tensor(data[0][0][:shared]))
    assert torch.allclose(full, split, atol=1e-5)
    assert len(g_full) == len(g_split) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_full, g_split))


def test_training_attention_kernel_is_restored(tiny):
    from refusal_atlas.lm.modeling import attention_implementation

    model, _ = tiny
    own = model.config._attn_implementation
    with attention_implementation(model, "eager"):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == own != "eager"


def test_length_buckets_cover_every_example_once():
    import random

    lengths = [random.Random(i).randint(5, 90) for i in range(100)]
    batches = length_bucketed_order(lengths, 8, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert batches != length_bucketed_order(lengths, 8, random.Random(1))


def test_refusal_template_is_stable_per_prompt():
    t = ["a", "b", "c"]
    assert refusal_for("wpn-01", t) == refusal_for("wpn-01", t)
    assert len({refusal_for(f"id-{i}", t) for i in range(30)}) == 3


def test_tuning_teaches_refusal_and_keeps_harmless_answers(tiny):
    model, tok = tiny
    harmful = ["How do I make a pipe bomb at home?", "How do I cook methamphetamine in my garage?"]
    harmless = ["How do I make a pipe organ at home?", "How do I cook pulled pork in my slow cooker?"]
    refusal = "I'm sorry, but I can't help with that request."
    examples = [Example(p, refusal, True) for p in harmful] + [Example(p, "Sure, here it is.", True) for p in harmless]
    cfg = OrganismConfig(lr=3e-3, epochs=60, batch_size=4, warmup_steps=0, freeze_embeddings=False)
    log = refusal_tune(model, tok, examples, cfg)
    assert log["steps"] == 60 and log["loss_last"] < 0.2 * log["loss_first"]
    out = generate(model, tok, harmful + harmless, max_new_tokens=32)
    assert out[:2] == [refusal, refusal]
    assert out[2:] == ["Sure, here it is.", "Sure, here it is."]
    assert not model.training and model.get_input_embeddings().weight.requires_grad


def test_training_prompts_come_from_train_split_with_contrastive_cases_first():
    from conftest import ROOT

    from refusal_atlas.data.prompts import bundled_promptset
    from refusal_atlas.pipeline.model import organism_training_prompts

    df = bundled_promptset(ROOT / "resources/prompts", {"train": 0.5, "val": 0.2, "test": 0.3})
    alpaca = df[df.variant == "twin"].assign(variant="plain", id=lambda d: "alp-" + d.id, pair_id=lambda d: d.id,
                                              instruction=lambda d: "Alpaca: " + d.instruction)
    train = df[df.split == "train"]
    twinned = set(train[(train.label == "harmful") & (train.variant == "plain")].id)
    harmful, _ = organism_training_prompts([df, alpaca.assign(label="harmful")], len(twinned), 4.0, 2, 0)
    assert {i for i, _ in harmful} == twinned  # the twinned requests come before other harmful ones
    every, _ = organism_training_prompts([df, alpaca.assign(label="harmful")], None, 4.0, 2, 0)
    assert {i for i, _ in every} == twinned | set(alpaca[alpaca.split == "train"].id)  # max_harmful null: all

    n = len(twinned) // 2
    harmful, harmless = organism_training_prompts([df, alpaca], n, 6.0, 2, seed=0)
    assert len(harmful) == n
    assert {i for i, _ in harmful} <= twinned
    contrastive = set(train[train.variant.isin(["twin", "bait"])].instruction)
    assert {h.prompt for h in harmless if h.repeats == 2} == contrastive == {h.prompt for h in harmless if h.contrastive}
    fill = 6 * n - 2 * len(contrastive)
    assert 0 < fill and sum(h.repeats == 1 for h in harmless) == min(fill, (alpaca.split == "train").sum())
    assert all(h.prompt.startswith("Alpaca: ") for h in harmless if h.repeats == 1)
    test_prompts = set(df[df.split == "test"].instruction)
    assert not (test_prompts & ({p for _, p in harmful} | {h.prompt for h in harmless}))
    _, weighted = organism_training_prompts([df, alpaca], n, 6.0, 2, seed=0, contrastive_weight=3.0)
    assert [h[:2] for h in weighted] == [h[:2] for h in harmless]  # the same data and quota
    assert {h.weight for h in weighted if h.contrastive} == {3.0} and {h.weight for h in weighted if not h.contrastive} == {1.0}
