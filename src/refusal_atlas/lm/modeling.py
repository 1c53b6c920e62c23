"""Loading chat models and talking to them through their chat template (HF transformers).

Hooks go on the HF modules directly: on CPU, HF ``generate`` with a KV cache is about 5x faster
than TransformerLens (ARCHITECTURE.md, "Generation speed").
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Cache, PreTrainedModel, PreTrainedTokenizerBase

# Tokens that end an assistant turn in the chat templates of the models we support. Stopping
# on <eos> alone is the reference's Gemma bug: Gemma ends its turn with <end_of_turn>.
END_OF_TURN_TOKENS: tuple[str, ...] = (
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|end|>",
    # Llama-3.1 closes a tool-calling turn with <|eom_id|>
    "<|eom_id|>",
)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} was requested but no CUDA GPU is visible "
            "(set device: cpu or auto in the config, or run on a GPU node)"
        )
    return dev


def load_model(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local HF model directory in eval mode, with a left-padding tokenizer.

    On ``cuda`` with several visible GPUs (a job that asked for more than one, see
    :mod:`refusal_atlas.cluster.gpus`) the decoder blocks are spread over them by accelerate's
    ``device_map="auto"``; SAEs and hooks then follow their layer (:func:`module_device`).
    """
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dev = resolve_device(device)
    split = dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
        **({"device_map": "auto"} if split else {}),
    )
    if not split:
        model.to(dev)
    return model.eval(), tok


def autocast(model: PreTrainedModel, dtype: str | None):
    """Mixed precision on the model's device (``dtype`` "bfloat16" or "float16"; None or
    "float32": none).

    For float32 weights on CPUs with bf16 units it about halves forward time (measured 2x for
    SmolLM2-135M on an AVX512-BF16 EPYC); weights in ``dtype`` already make it a no-op.
    """
    if dtype in (None, "float32"):
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=getattr(torch, dtype))


@contextlib.contextmanager
def attention_implementation(model: PreTrainedModel, name: str | None) -> Iterator[None]:
    """Run ``model`` with another attention kernel ("eager", "sdpa", ...; None: unchanged) and
    restore its own afterwards.

    Training sequences of ~40 tokens on a CPU are a case for "eager": SDPA's CPU flash kernel
    has a slow backward; eager made refusal-tuning steps about 20% faster here.
    """
    own = model.config._attn_implementation
    if name is None or name == own:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(own)


def module_device(module: nn.Module) -> torch.device:
    """Where a module's weights live: a layer's SAE and hook tensors must sit there too."""
    return next(module.parameters()).device


def layer_device(model: PreTrainedModel, layer: int) -> torch.device:
    return module_device(decoder_layers(model)[layer])


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The list of transformer blocks whose outputs are the residual stream (resid_post)."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    for attr in ("layers", "h"):
        layers = getattr(base, attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__}")


# TransformerLens hook names that an SAE may read, as Gemma Scope, Llama Scope and Marks et al.
# name them: the residual stream after a block, the attention heads' concatenated outputs before
# their output projection, and what the attention and the MLP add to the stream.
SITE_HOOKS = {"resid": ("hook_resid_post",), "attn": ("attn.hook_z", "hook_attn_out"), "mlp": ("hook_mlp_out",)}


def parse_hook(hook_name: str) -> tuple[int, str, str]:
    """``(layer, submodule, hook)`` of a TransformerLens hook name in :data:`SITE_HOOKS`."""
    hooks = "|".join(re.escape(h) for hs in SITE_HOOKS.values() for h in hs)
    m = re.fullmatch(rf"blocks\.(\d+)\.({hooks})", hook_name or "")
    if m is None:
        raise ValueError(f"an SAE here reads one of blocks.<l>.{{{', '.join(h for hs in SITE_HOOKS.values() for h in hs)}}};"
                         f" this one reads {hook_name!r}")
    return int(m[1]), next(k for k, hs in SITE_HOOKS.items() if m[2] in hs), m[2]


def hook_module(model: PreTrainedModel, hook_name: str) -> tuple[nn.Module, bool]:
    """The HF module whose output is ``hook_name``'s activation, and whether it is that module's
    input instead (``attn.hook_z``: the output projection's input, as Marks et al. hook Gemma)."""
    layer, _, hook = parse_hook(hook_name)
    block = decoder_layers(model)[layer]
    if hook == "hook_resid_post":
        return block, False
    if hook == "attn.hook_z":
        return block.self_attn.o_proj, True
    # Gemma-2/3 normalise each sublayer's output before adding it to the stream, and
    # TransformerLens hooks after that norm (its ln1_post and ln2_post)
    sandwich = hasattr(block, "pre_feedforward_layernorm")
    if hook == "hook_attn_out":
        return (block.post_attention_layernorm if sandwich else block.self_attn), False
    return (block.post_feedforward_layernorm if sandwich else block.mlp), False


@contextlib.contextmanager
def hooks_removed(handles: list) -> Iterator[list]:
    """Remove ``handles`` however the block ends (an exception that stops a pass early included)."""
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def hook_site(model: PreTrainedModel, hook_name: str, fn, *, replace: bool = True):
    """Register ``fn(activation)`` at ``hook_name``; its value replaces the activation when
    ``replace``. Returns the handle."""
    module, on_input = hook_module(model, hook_name)
    if on_input:
        def pre(_m, args):
            out = fn(args[0])
            return (out, *args[1:]) if replace else None

        return module.register_forward_pre_hook(pre)

    def post(_m, _i, output):
        h = output[0] if isinstance(output, tuple) else output
        out = fn(h)
        if not replace:
            return None
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return module.register_forward_hook(post)


def embedding_module(model: PreTrainedModel) -> nn.Module:
    return model.get_input_embeddings()


def format_chat(
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    system_prompt: str | None = None,
) -> list[str]:
    """User turn only, generation prompt on (Yeo et al. 2025 §3; Arditi et al. 2024 §2)."""
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template; refusal-atlas studies chat models")
    from jinja2 import TemplateError

    out = []
    for text in instructions:
        messages = [{"role": "user", "content": text}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        try:
            out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        except TemplateError as e:
            if system_prompt is None:
                raise
            # Gemma-2's template has no system role and raises mid-job otherwise
            raise ValueError(f"this model's chat template rejects a system prompt ({e}); set the model's "
                             "system_prompt to null") from None
    return out


def common_prefix_length(rows: Sequence[Sequence[int]], limit: int) -> int:
    """How many leading tokens all ``rows`` share, at most ``limit``: with a chat template, its
    system header (24 tokens for SmolLM2), which causal attention lets a batch compute once."""
    if not rows:
        return 0
    first, k = rows[0], 0
    while k < limit and all(len(r) > k and r[k] == first[k] for r in rows):
        k += 1
    return k


def template_header_length(tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None) -> int:
    """Tokens the chat template puts before the first user turn: BOS and any system block.

    The reference's ``num_bos_token`` (Yeo et al. 2025, github wj210/refusal_sae): 1 for Gemma-2
    (BOS), BOS plus the dated system header for Llama-3.1. It is read from the template per model:
    the user turn's opener is what the template writes between an assistant turn's closer and the
    next user message, and the header is the prompt's text before that opener. At least 1: the
    first position is the attention sink either way.
    """
    from jinja2 import TemplateError

    a, b, c = "QQFIRSTQQ", "QQSECONDQQ", "QQTHIRDQQ"
    sys_msgs = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]

    def render(turns: list[tuple[str, str]], gen: bool) -> str:
        msgs = sys_msgs + [{"role": r, "content": t} for r, t in turns]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    [prompt] = format_chat(tokenizer, [a], system_prompt)
    try:
        closed = render([("user", a), ("assistant", b)], False)
        two = render([("user", a), ("assistant", b), ("user", c)], True)
    except (TemplateError, IndexError, KeyError, TypeError, ValueError):
        return 1  # a template that takes one turn only: no header beyond the sink is known
    closer = closed[closed.index(b) + len(b):]
    between = two[two.index(b) + len(b):two.index(c)]
    before = prompt[:prompt.index(a)]
    opener = between[len(closer):] if between.startswith(closer) else between
    if not opener or not before.endswith(opener):
        return 1
    head = tokenizer(before[: len(before) - len(opener)], add_special_tokens=False).input_ids
    full = tokenizer(prompt, add_special_tokens=False).input_ids
    return max(1, common_prefix_length([head, full], len(head)))


def post_instruction_length(tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None) -> int:
    """Tokens the chat template puts after the user's instruction, through the generation prompt.

    Arditi et al. 2024 (§2.3; github andyrdt/refusal_direction, its ``eoi_toks``) take a candidate
    direction at each of these post-instruction positions. Read from the template per model (5 for
    SmolLM2: ``<|im_end|>``, newline, ``<|im_start|>``, ``assistant``, newline): the longest run of
    the prompt's last tokens that the template's tail alone tokenizes to.
    """
    a = "QQINSTRUCTIONQQ"
    [prompt] = format_chat(tokenizer, [a], system_prompt)
    tail = tokenizer(prompt[prompt.index(a) + len(a):], add_special_tokens=False).input_ids
    full = tokenizer(prompt, add_special_tokens=False).input_ids
    n = common_prefix_length([full[::-1], tail[::-1]], len(tail))
    if n == 0:
        raise ValueError("the chat template writes nothing after the instruction that tokenizes on its own: "
                         "no post-instruction positions; use direction.positions: last")
    return n


def sliding_window(model: PreTrainedModel) -> int | None:
    """The shortest attention window of any layer, or None where every layer attends globally
    (Gemma-2/3's local layers, Mistral; Qwen2 only with ``use_sliding_window``)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return None
    return int(window)


def attend_to_prefix(cache: Cache, attention_mask: torch.Tensor) -> torch.Tensor:
    """Repeat a batch-1 prefix KV ``cache`` in place for each row of ``attention_mask``; returns the
    mask with the prefix's positions in front, so every row attends to the one prefix."""
    rows = attention_mask.shape[0]
    cache.batch_repeat_interleave(rows)
    return torch.cat([attention_mask.new_ones(rows, cache.get_seq_length()), attention_mask], 1)


def require_left_padding(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.padding_side != "left":
        raise ValueError("refusal-atlas reads the last prompt token at position -1: pad on the left")


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    system_prompt: str | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Left-padded batch, so position -1 is every prompt's last token."""
    require_left_padding(tokenizer)
    enc = tokenizer(
        format_chat(tokenizer, instructions, system_prompt),
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,  # the chat template already holds BOS where a model wants it
    )
    return {k: v.to(device) for k, v in enc.items()}


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that closes an assistant turn in this model's chat template."""
    vocab = tokenizer.get_vocab()
    for t in END_OF_TURN_TOKENS:
        if t in vocab:
            return vocab[t]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither an end-of-turn nor an eos token")
    return tokenizer.eos_token_id


def special_token_mask(tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor) -> torch.Tensor:
    """True where a token is special (BOS, chat markers, padding): massive-activation positions."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=input_ids.device)
    return torch.isin(input_ids, special)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token, whatever its left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def block_hidden(output) -> torch.Tensor:
    """The residual stream in a decoder block's output (a tensor, or a tuple led by it)."""
    return output[0] if isinstance(output, tuple) else output


def last_token_logits(model: PreTrainedModel, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, vocab]`` logits at the last prompt token of a left-padded batch (one unembedding)."""
    pos = position_ids_from_mask(enc["attention_mask"])
    return model(**enc, position_ids=pos, use_cache=False, logits_to_keep=1).logits[:, -1]


class LayerGrab:
    """resid_post of some decoder blocks during one forward pass."""

    def __init__(self, model: PreTrainedModel, layers: Sequence[int]):
        self.model, self.layers, self.out = model, sorted(set(layers)), {}

    def __enter__(self):
        blocks = decoder_layers(self.model)

        def make(layer):
            def hook(_m, _i, output):
                self.out[layer] = block_hidden(output).detach()
            return hook

        self.handles = [blocks[l].register_forward_hook(make(l)) for l in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def run(self, enc: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        self.out.clear()
        self.model(**enc, position_ids=position_ids_from_mask(enc["attention_mask"]), use_cache=False,
                   logits_to_keep=1)
        if len(self.out) != len(self.layers):
            raise RuntimeError(f"only {len(self.out)} of {len(self.layers)} layer hooks fired")
        return dict(self.out)
