"""Random chat models and SAEs of a chosen shape, for the tests and the benchmark suite.

A byte-level BPE with a ChatML template makes a tiny model usable by every stage (chat
formatting, end-of-turn stopping, left padding); :func:`random_gemma2` and :func:`random_saes`
build the real compute of gemma-2-2b with Gemma Scope widths without downloading anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from sae_lens import SAE

    from refusal_atlas.cluster.memory import ModelShape

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def chat_tokenizer(corpus: Sequence[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``corpus``, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([*corpus, "user assistant system\n"], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.padding_side = "left"
    return fast


def tiny_llama(tokenizer: PreTrainedTokenizerFast, n_layers: int = 4, d_model: int = 64, seed: int = 0
               ) -> LlamaForCausalLM:
    """A random Llama of ``n_layers`` blocks of width ``d_model`` for ``tokenizer``."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


def random_gemma2(shape: ModelShape, device: str, dtype: torch.dtype, seed: int = 0):
    """A random Gemma-2 with ``shape`` (gemma-2-2b's: :data:`refusal_atlas.cluster.memory.GEMMA_2_2B`)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(
        vocab_size=shape.vocab, hidden_size=shape.d_model, intermediate_size=shape.d_mlp,
        num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
        num_key_value_heads=max(1, shape.n_heads // 2), head_dim=max(8, shape.d_model // shape.n_heads),
    )
    with torch.device(device):
        return Gemma2ForCausalLM(cfg).to(dtype).eval().requires_grad_(False)


def random_saes(d_model: int, d_sae: int, layers: Sequence[int], device: str, dtype: torch.dtype,
                kind: str = "jumprelu", k: int = 32) -> dict[int, SAE]:
    """Random SAELens SAEs on ``blocks.{layer}.hook_resid_post``: JumpReLU (Gemma Scope's form) or TopK."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

    from refusal_atlas.saes.loading import hook_name

    name = str(dtype).split(".")[-1]
    out = {}
    for layer in layers:
        if kind == "jumprelu":
            cfg = JumpReLUSAEConfig(d_in=d_model, d_sae=d_sae, dtype=name, device=device)
            sae = JumpReLUSAE(cfg)
        else:
            sae = TopKSAE(TopKSAEConfig(d_in=d_model, d_sae=d_sae, k=k, dtype=name, device=device))
        sae.cfg.metadata.hook_name = hook_name(layer)
        out[layer] = sae.requires_grad_(False).eval()
    return out
