"""Tiny random chat models of each family the configs name, with the family's own chat format.

Each family differs where the stages are fragile: where BOS sits, how a system prompt is handled
(Gemma-2 has no system role, Llama-3.1 puts it after a dated header, Qwen2.5 supplies a default,
Mistral folds it into the last user turn), which token ends a turn, and the architecture's own
quirks (Gemma-2's logit soft-capping and sliding-window layers). The templates reproduce the
released models' behaviour for a conversation of user and assistant turns; tools are left out.
The models are built from transformers' own config classes, so the stages run the real
``Gemma2ForCausalLM``, ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and ``MistralForCausalLM``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from refusal_atlas.testing.synthetic import CHATML

GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# Llama-3.1 always opens with a system header that carries the knowledge cut-off and a date.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: ' + date_string + '\n\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n' }}{%- endif %}{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Mistral-Instruct v0.3: no generation prompt; the system prompt joins the last user turn.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)


@dataclass(frozen=True)
class Family:
    """A chat model family: its template, special tokens, the token that ends an assistant turn,
    and how it treats a system prompt (``"own"``, ``"none"``: an error, ``"folded"`` into the user
    turn)."""

    name: str
    template: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    end_of_turn: str
    system: str
    build: Callable[[PreTrainedTokenizerFast, int, int], PreTrainedModel]


def _common(tok: PreTrainedTokenizerFast, n_layers: int, d_model: int, tied: bool) -> dict:
    # Tied as the released model is (Gemma-2 yes; Llama-3.1-8B, Qwen2.5-7B, Mistral-7B no). A random
    # tied model also tends to repeat its last input token, which here is a newline or [/INST].
    return dict(vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tied,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _gemma2(tok, n_layers, d_model):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # a window shorter than a chat prompt, so the local layers really slide
    return Gemma2ForCausalLM(Gemma2Config(**_common(tok, n_layers, d_model, tied=True), head_dim=d_model // 4,
                                          query_pre_attn_scalar=d_model // 4, sliding_window=8,
                                          final_logit_softcapping=30.0, attn_logit_softcapping=50.0))


def _llama3(tok, n_layers, d_model):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_common(tok, n_layers, d_model, tied=False), rope_theta=500000.0))


def _chatml_llama(tok, n_layers, d_model):
    from refusal_atlas.testing.synthetic import tiny_llama

    return tiny_llama(tok, n_layers=n_layers, d_model=d_model)


def _qwen2(tok, n_layers, d_model):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_common(tok, n_layers, d_model, tied=False)))


def _mistral(tok, n_layers, d_model):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_common(tok, n_layers, d_model, tied=False), sliding_window=None))


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("chatml-llama", CHATML, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_start|>", "<|im_end|>",
           "<|endoftext|>", "<|im_end|>", "own", _chatml_llama),
    Family("gemma2", GEMMA2_TEMPLATE, ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), "<bos>",
           "<eos>", "<pad>", "<end_of_turn>", "none", _gemma2),
    Family("llama3", LLAMA3_TEMPLATE, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                       "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                                       "<|finetune_right_pad_id|>"),
           "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<|eot_id|>", "own", _llama3),
    Family("qwen2", QWEN2_TEMPLATE, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>",
           "<|endoftext|>", "<|im_end|>", "own", _qwen2),
    Family("mistral", MISTRAL_TEMPLATE, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>", "<unk>",
           "</s>", "folded", _mistral),
)}


def family_tokenizer(family: Family, corpus: Sequence[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``corpus`` with ``family``'s special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(family.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*corpus, "user assistant system model\n"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos,
                                   pad_token=family.pad, unk_token=family.pad,
                                   additional_special_tokens=[s for s in family.specials
                                                              if s not in (family.bos, family.eos, family.pad)])
    fast.chat_template = family.template
    fast.padding_side = "left"
    return fast


def tiny_chat_model(family: Family, tokenizer: PreTrainedTokenizerFast, n_layers: int = 4, d_model: int = 64,
                    seed: int = 0) -> PreTrainedModel:
    """A random ``family`` model of ``n_layers`` blocks of width ``d_model`` for ``tokenizer``."""
    torch.manual_seed(seed)
    model = family.build(tokenizer, n_layers, d_model).eval()
    model.generation_config.eos_token_id = sorted({tokenizer.convert_tokens_to_ids(family.end_of_turn),
                                                   tokenizer.eos_token_id})
    return model


def save_tiny_chat_model(family: Family, path: str | Path, corpus: Sequence[str], **kw) -> Path:
    """Build and save a tiny ``family`` model as an HF directory, as ``models.<m>.source: local`` reads it."""
    tok = family_tokenizer(family, corpus)
    model = tiny_chat_model(family, tok, **kw)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)
