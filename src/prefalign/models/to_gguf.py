"""A loaded HF causal LM + its tokenizer -> one GGUF file for llama.cpp and Ollama, unquantised.

What llama.cpp's own converter (convert_hf_to_gguf.py) writes for these architectures, from the model
in memory: its tensor names (the `gguf` package's TensorNameMap), its layouts, its hyperparameter keys
and the GPT-2-style BPE tokenizer as `tokenizer.ggml.*`. The layout changes, each undone by readers:

- llama/mistral: Q and K rows permuted per head. HF applies RoPE to the two halves of a head
  (rotate_half); llama.cpp's kernel rotates adjacent pairs, so row i of each half becomes row 2i / 2i+1.
- gpt2: the Conv1D projections are stored (in, out); llama.cpp wants (out, in) like a Linear.
- mamba: A is stored as -exp(A_log) (what the scan uses), the depthwise conv1d as (d_inner, kernel).

Types as llama.cpp's converter picks them: 1-D tensors, norms, position embeddings, Mamba's A, D and
conv1d always F32; the rest in the requested type (F32, F16 or BF16). A tied output head is not
written (llama.cpp and transformers both fall back to the token embedding).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelError

GGUF_DTYPES = ("float32", "float16", "bfloat16")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ModelError("GGUF export needs the gguf package: pip install 'prefalign[gguf]'") from None
    return gguf


def _rope(config) -> dict[str, Any]:
    """RoPE settings across transformers versions (rope_parameters in v5, rope_theta/rope_scaling before)."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ---- per architecture: what cannot be written, the hyperparameters, the tensor layouts ----

def _attention_problems(config) -> list[str]:
    problems = []
    if _rope(config)["rope_type"] != "default":
        problems.append(f"RoPE scaling {_rope(config)['rope_type']!r} (only unscaled RoPE is written)")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} (llama.cpp's graph uses SiLU)")
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if getattr(config, flag, False):
            problems.append(f"{flag}=true")
    return problems


def _attention_hparams(w, config) -> None:
    # Mistral's sliding window: llama.cpp's llama graph attends to the whole context, so the context
    # length is capped at the window, inside which the two agree exactly
    window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    w.add_context_length(min(config.max_position_embeddings, window or config.max_position_embeddings))
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    w.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(_head_dim(config))
    w.add_key_length(_head_dim(config))
    w.add_value_length(_head_dim(config))
    w.add_vocab_size(config.vocab_size)


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's Q/K rows (per head: first half, second half) -> llama.cpp's (interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_tensor(name: str, t: torch.Tensor, config) -> torch.Tensor:
    if ".self_attn.q_proj." in name:
        return rope_permute(t, config.num_attention_heads)
    if ".self_attn.k_proj." in name:
        return rope_permute(t, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return t


def _gpt2_problems(config) -> list[str]:
    problems = []
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {config.activation_function!r} (llama.cpp's gpt2 uses tanh GELU)")
    # llama.cpp always scales scores by 1/sqrt(head_dim) and never by layer; reorder_and_upcast_attn only
    # computes the same scores in fp32, as llama.cpp does anyway, so it is written
    if not config.scale_attn_weights:
        problems.append("scale_attn_weights=false (llama.cpp always scales attention by 1/sqrt(head_dim))")
    if config.scale_attn_by_inverse_layer_idx:
        problems.append("scale_attn_by_inverse_layer_idx=true")
    if getattr(config, "add_cross_attention", False):
        problems.append("add_cross_attention=true")
    return problems


def _gpt2_hparams(w, config) -> None:
    w.add_context_length(config.n_positions)
    w.add_embedding_length(config.n_embd)
    w.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    w.add_head_count(config.n_head)
    w.add_layer_norm_eps(config.layer_norm_epsilon)


def _gpt2_tensor(name: str, t: torch.Tensor, config) -> torch.Tensor:
    conv1d = name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))
    return t.T.contiguous() if conv1d else t  # Conv1D (in, out) -> (out, in)


def _mamba_problems(config) -> list[str]:
    problems = []
    if config.intermediate_size != 2 * config.hidden_size:
        problems.append(f"intermediate_size {config.intermediate_size} != 2 x hidden_size (llama.cpp assumes expand 2)")
    if config.use_bias:
        problems.append("use_bias=true (llama.cpp's Mamba has no in/out projection bias)")
    if not config.use_conv_bias:
        problems.append("use_conv_bias=false (llama.cpp's Mamba requires the conv1d bias)")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act {config.hidden_act!r}")
    return problems


def _mamba_hparams(w, config) -> None:
    w.add_context_length(2**20)  # a recurrent model has no trained context length; llama.cpp's converter says the same
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_ssm_conv_kernel(config.conv_kernel)
    w.add_ssm_inner_size(config.intermediate_size)
    w.add_ssm_state_size(config.state_size)
    w.add_ssm_time_step_rank(config.time_step_rank)
    w.add_layer_norm_rms_eps(config.layer_norm_epsilon)
    w.add_ssm_dt_b_c_rms(False)


def _mamba_tensor(name: str, t: torch.Tensor, config) -> torch.Tensor:
    if name.endswith(".A_log"):
        return -torch.exp(t)
    if name.endswith(".conv1d.weight"):
        return t.squeeze(1)  # (d_inner, 1, kernel) -> (d_inner, kernel)
    return t


@dataclass(frozen=True)
class Layout:
    arch: str  # the gguf package's MODEL_ARCH member
    problems: Callable[[Any], list[str]]
    hparams: Callable[[Any, Any], None]
    tensor: Callable[[str, torch.Tensor, Any], torch.Tensor]


LAYOUTS = {
    "llama": Layout("LLAMA", _attention_problems, _attention_hparams, _llama_tensor),
    "mistral": Layout("LLAMA", _attention_problems, _attention_hparams, _llama_tensor),  # llama.cpp's choice too
    "qwen2": Layout("QWEN2", _attention_problems, _attention_hparams, lambda name, t, config: t),
    "gpt2": Layout("GPT2", _gpt2_problems, _gpt2_hparams, _gpt2_tensor),
    "mamba": Layout("MAMBA", _mamba_problems, _mamba_hparams, _mamba_tensor),
}


def layout_for(config, source: str | Path) -> Layout:
    kind = getattr(config, "model_type", "?")
    if kind not in LAYOUTS:
        archs = ", ".join(getattr(config, "architectures", None) or [])
        raise ModelError(f"{source}: GGUF export does not support {kind}{f' ({archs})' if archs else ''}; it writes "
                         f"{', '.join(LAYOUTS)}. Export --format hf and use llama.cpp's convert_hf_to_gguf.py "
                         "for other architectures")
    problems = LAYOUTS[kind].problems(config)
    if problems:
        raise ModelError(f"{source}: this {kind} model cannot be written as GGUF as llama.cpp would run it: "
                         + "; ".join(problems))
    return LAYOUTS[kind]


# ---- the tokenizer: a byte-level BPE (GPT-2 style) as tokenizer.ggml.* ----

# Split regexes of published byte-level BPE tokenizers (transformers' Qwen2 and Llama-3 tokenizers write
# these strings), by the name of the llama.cpp pre-tokenizer that implements each
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_REGEXES = {"qwen2": _CONTRACTIONS + r"\p{N}" + _REST, "llama-bpe": _CONTRACTIONS + r"\p{N}{1,3}" + _REST}
# a normalizer llama.cpp does not apply; NFC leaves text that is already NFC (nearly all text) unchanged,
# and llama.cpp's own converter writes Qwen2 (which has it) the same way
_HARMLESS_NORMALIZERS = (None, {"type": "NFC"})


def _pre_tokenizer(spec: dict | None, source: str | Path) -> str:
    """llama.cpp's name for how the text is split before BPE, read from the tokenizer's structure (llama.cpp's
    converter hashes the token ids of a test string instead, which only knows published tokenizers)."""

    def byte_level(p: dict, regex: bool) -> bool:  # regex: ByteLevel splits with the GPT-2 regex itself
        return (p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex
                and not p.get("add_prefix_space", False))

    parts = (spec or {}).get("pretokenizers", [])
    if spec and byte_level(spec, regex=True):
        return "gpt-2"
    if len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits"):
        if byte_level(parts[1], regex=True):
            return "smollm"  # each digit alone, then the GPT-2 regex (SmolLM, StarCoder)
    if len(parts) == 2 and parts[0].get("type") == "Split" and byte_level(parts[1], regex=False):
        pattern = parts[0].get("pattern", {}).get("Regex")
        name = next((k for k, v in SPLIT_REGEXES.items() if v == pattern), None)
        if name and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert"):
            return name
    text = json.dumps(spec)
    kind = " (SentencePiece-style, as Llama 2 and Mistral's)" if "Metaspace" in text else ""
    raise ModelError(f"{source}: GGUF export writes byte-level BPE tokenizers that llama.cpp splits the same way "
                     f"({', '.join(['gpt-2', 'smollm', *SPLIT_REGEXES])}); this tokenizer's pre-tokenizer{kind} is "
                     f"{text[:300]}")


def _adds(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS in front / EOS at the end of a text, as llama.cpp must too."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    ids = tokenizer("a")["input_ids"]
    extra = len(ids) > len(plain)
    return (extra and ids[0] == tokenizer.bos_token_id and ids[:1] != plain[:1],
            extra and ids[-1] == tokenizer.eos_token_id and ids[-1:] != plain[-1:])


def _tokenizer_spec(tokenizer, n_vocab: int, source: str | Path) -> tuple[dict, str]:
    """(the tokenizer.json structure, llama.cpp's pre-tokenizer name), or why llama.cpp could not run it."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or spec.get("normalizer") not in _HARMLESS_NORMALIZERS:
        raise ModelError(f"{source}: GGUF export writes byte-level BPE tokenizers without a normalizer (or NFC); "
                         f"this one is {spec['model']['type']} with normalizer "
                         f"{json.dumps(spec.get('normalizer'))[:120]}")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"), source)
    top = max(tokenizer.get_vocab().values())
    if top >= n_vocab:
        raise ModelError(f"{source}: the tokenizer has ids up to {top} but the embedding only {n_vocab} rows")
    return spec, pre


def check_gguf(config, tokenizer, source: str | Path) -> Layout:
    """Every reason an export is refused, from the config and the tokenizer alone: called before the weights
    are loaded (a 7B model takes minutes and tens of GB to load; it must not be refused after that)."""
    layout = layout_for(config, source)
    _tokenizer_spec(tokenizer, config.vocab_size, source)
    return layout


def _special_ids(tokenizer, config, n_vocab: int) -> dict[str, int]:
    """The tokenizer's special tokens, then config.json's for those it lacks, as llama.cpp's converter
    (gguf-py's SpecialVocab) does: a BPE file without tokenizer.ggml.bos_token_id gets BOS id 11 in llama.cpp.
    Qwen2.5's tokenizer has no bos_token; its config names <|endoftext|>."""
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        for token_id in (getattr(tokenizer, f"{kind}_token_id", None), getattr(config, f"{kind}_token_id", None)):
            if isinstance(token_id, int) and 0 <= token_id < n_vocab:  # a list (Llama 3's eos) is skipped, as there
                ids[kind] = token_id
                break
    return ids


def _tokenizer_kv(w, tokenizer, config, n_vocab: int, source: str | Path) -> None:
    gguf = _gguf()
    spec, pre = _tokenizer_spec(tokenizer, n_vocab, source)
    vocab = tokenizer.get_vocab()
    added = tokenizer.added_tokens_decoder
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]  # rows no token uses, named as llama.cpp's converter names them
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        if i not in added:
            types[i] = gguf.TokenType.NORMAL
        else:  # special (<|im_end|>) tokens are control tokens: never produced from text, never printed
            types[i] = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for kind, token_id in _special_ids(tokenizer, config, n_vocab).items():
        getattr(w, f"add_{kind}_token_id")(token_id)
    bos, eos = _adds(tokenizer)
    w.add_add_bos_token(bos)
    w.add_add_eos_token(eos)
    template = tokenizer.chat_template
    if template:
        w.add_chat_template(template if isinstance(template, str) else
                            [{"name": k, "template": v} for k, v in template.items()])


# ---- the file ----

def _type_for(gguf, name: str, data: np.ndarray, wanted):
    """llama.cpp's converter's rule: what stays F32 whatever type was asked for."""
    keep = (data.ndim <= 1 or not name.endswith(".weight") or name.endswith("_norm.weight")
            or name in ("position_embd.weight",) or name.endswith(".ssm_conv1d.weight"))
    return gguf.GGMLQuantizationType.F32 if keep else wanted


def _tied(model, t: torch.Tensor) -> bool:
    """The output head is the token embedding (tied, or an equal copy): llama.cpp reuses token_embd."""
    embed = model.get_input_embeddings().weight
    return t is embed or (t.shape == embed.shape and torch.equal(t, embed))


def _tensors(model, layout: Layout, qtype, source):
    """(GGUF name, array as written, its type) for every weight, in state_dict order."""
    gguf = _gguf()
    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, layout.arch), config.num_hidden_layers)
    with torch.no_grad():
        for hf_name, t in model.state_dict(keep_vars=True).items():
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:  # never drop a weight silently: the file would run, wrongly
                raise ModelError(f"{source}: tensor {hf_name} has no llama.cpp name for {layout.arch}")
            if gguf_name == "output.weight" and _tied(model, t):
                continue
            data = layout.tensor(hf_name, t.detach().float().cpu(), config).numpy()
            kind = _type_for(gguf, gguf_name, data, qtype)
            yield gguf_name, gguf.quants.quantize(data, kind), kind


def write_gguf(model, tokenizer, path: str | Path, dtype: str = "float32", name: str | None = None,
               source: str | Path = "") -> Path:
    """Write MODEL (a transformers causal LM, any adapter already merged) and TOKENIZER as one GGUF file.

    Streamed: a first pass over the weights records each tensor's shape and type, the second writes them
    one at a time, so memory holds the model and one converted tensor, not a converted copy of all."""
    gguf = _gguf()
    config = model.config
    source = source or path
    n_vocab = model.get_input_embeddings().weight.shape[0]
    layout = layout_for(config, source)
    _tokenizer_spec(tokenizer, n_vocab, source)  # refused before anything is written
    if dtype not in GGUF_DTYPES:
        raise ModelError(f"GGUF export: dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    qtype = {"float32": gguf.GGMLQuantizationType.F32, "float16": gguf.GGMLQuantizationType.F16,
             "bfloat16": gguf.GGMLQuantizationType.BF16}[dtype]
    ftype = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
             "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    path = Path(path)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, layout.arch)])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or path.stem)
    w.add_block_count(config.num_hidden_layers)
    layout.hparams(w, config)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor_name, data, kind in _tensors(model, layout, qtype, source):
        w.add_tensor_info(tensor_name, data.shape, data.dtype, data.nbytes, raw_dtype=kind)
    _tokenizer_kv(w, tokenizer, config, n_vocab, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, data, _ in _tensors(model, layout, qtype, source):
        w.write_tensor_data(data)
    w.close()
    return path
