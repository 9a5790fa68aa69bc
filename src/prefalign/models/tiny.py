"""Tiny tokenizers and models built from scratch, for tests and benchmarks: nothing is downloaded."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MambaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

# ChatML, as SmolLM2/Qwen write it: the assistant turn ends with <|im_end|>, the EOS token.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, *, bos: bool = False, chat: bool = True):
    """A byte-level BPE tokenizer (GPT-2 style) trained on `texts`, as a transformers fast tokenizer.

    bos=True makes it prepend <s> like Llama tokenizers do, to exercise BOS handling."""

    special = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="<|im_end|>" if chat else "</s>")
    if chat:
        fast.chat_template = CHATML
    return fast


ARCHS = ("gpt2", "llama", "qwen2", "mistral", "mamba")
# Mamba-2 and attention/Mamba hybrids: not in ARCHS (their torch-path scans are slow on CPU), for the
# tests of what their mixers allow (row layouts, LoRA targets). Layer 0 is Mamba, layer 1 attention.
SSM_ARCHS = ("mamba2", "jamba", "bamba", "falcon_h1", "nemotron_h", "granitemoehybrid")


def _ssm_config(arch: str, vocab_size: int, hidden: int, layers: int, heads: int, **extra):
    attn = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))
    m2 = dict(mamba_n_heads=4, mamba_d_head=hidden * 2 // 4, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16,
              mamba_expand=2)  # Mamba-2 mixers: heads x head_dim = expand x hidden
    kw = {
        "mamba2": dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_heads=4,
                       head_dim=hidden * 2 // 4, state_size=8, n_groups=1, expand=2, chunk_size=16),
        "jamba": dict(attn, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=layers + 1, num_experts=1,
                      mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4),
        "bamba": dict(attn, attn_layer_indices=list(range(1, layers, 2)), **m2),
        "falcon_h1": dict(attn, head_dim=hidden // heads, mamba_d_ssm=hidden * 2, **m2),  # parallel attn + Mamba-2
        "nemotron_h": dict(attn, head_dim=hidden // heads,
                           layers_block_type=(["mamba", "attention", "mlp"] * layers)[:layers],
                           mamba_num_heads=4, mamba_head_dim=hidden * 2 // 4, ssm_state_size=8, n_groups=1,
                           chunk_size=16, expand=2),
        "granitemoehybrid": dict(attn, shared_intermediate_size=hidden * 2, num_local_experts=0,
                                 layer_types=["mamba", "attention"] * (layers // 2) + ["mamba"] * (layers % 2), **m2),
    }[arch]
    return AutoConfig.for_model(arch, **kw, **extra)


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, **extra):
    """A small random-init config of a real architecture (the same code paths as the full-size model)."""

    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **extra)
    if arch in ("llama", "qwen2", "mistral"):
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
        return cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024,
                   tie_word_embeddings=extra.pop("tie_word_embeddings", True), **extra)
    if arch == "mamba":
        return MambaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, state_size=8,
                           expand=2, conv_kernel=4, **extra)
    if arch in SSM_ARCHS:
        return _ssm_config(arch, vocab_size, hidden, layers, heads, **extra)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS + SSM_ARCHS)}")


def build_model(arch: str, tokenizer=None, *, vocab_size: int | None = None, seed: int = 0, **kw):
    """A random-init causal LM; special token ids are taken from the tokenizer when one is given."""

    vocab = vocab_size or len(tokenizer)
    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = tiny_config(arch, vocab, **kw, **ids)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny(path, arch: str, tokenizer, **kw):
    """Write a tiny model + tokenizer as a standard HF folder (safetensors)."""
    model = build_model(arch, tokenizer, **kw)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path
