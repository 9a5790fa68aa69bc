"""Load any Hugging Face causal LM, local or a Hub id (safetensors only, no remote code unless asked), add LoRA."""

from __future__ import annotations

import inspect
import json
from functools import partial
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from .. import faults
from ..data.chat import set_chat_template
from ..errors import ConfigError, ModelError
from ..storage import commit, disk_full, remove, restore_aside, tmp_name
from .hub import adapter_base, base_reference, resolve_model

# LoRA targets per architecture: attention and MLP projections for Transformers. Mamba mixers: only
# projections the forward calls as modules (an adapter on a weight that code reads directly gets no
# gradient and stays at zero: inert). in_proj always is; x_proj is on Mamba-1's torch path (the
# CUDA kernel reads its weight). Never dt_proj (transformers multiplies dt_proj.weight itself),
# out_proj (the fused Mamba/Mamba-2 kernels read its weight; PEFT refuses it on mamba, mamba2,
# falcon_h1, nemotron_h) or conv1d. Hybrids: attention + MLP + in_proj. tests/test_ssm_layouts.py
# checks every default adapter gets a gradient. Unknown architectures: PEFT's "all-linear".
_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ["gate_proj", "up_proj", "down_proj"]
LORA_TARGETS = {
    "llama": _ATTN + _MLP,
    "mistral": _ATTN + _MLP,
    "qwen2": _ATTN + _MLP,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "mamba": ["in_proj", "x_proj"],
    "falcon_mamba": ["in_proj", "x_proj"],
    "mamba2": ["in_proj"],
    "jamba": _ATTN + _MLP + ["in_proj", "x_proj"],
    "bamba": _ATTN + _MLP + ["in_proj"],
    "falcon_h1": _ATTN + _MLP + ["in_proj"],
    "nemotron_h": _ATTN + ["up_proj", "down_proj", "in_proj"],  # its MLP has no gate
    # Granite-4-H: the dense shared MLP (its MoE experts are fused tensors, not Linear layers)
    "granitemoehybrid": _ATTN + ["shared_mlp.input_linear", "shared_mlp.output_linear", "in_proj"],
}


def _local(path: str | Path, *, tokenizer_only: bool = False, code: bool = False) -> Path:
    """A model folder or file on disk: SPEC itself, or a Hub id's snapshot in the cache (models/hub.py)."""
    path = resolve_model(path, tokenizer_only=tokenizer_only, code=code)
    if not path.exists():
        raise ModelError(f"{path}: no such model folder or file, nor a Hub id (org/name or org/name@revision)")
    if not code:
        refuse_code(path)
    return path


def refuse_code(path: Path) -> None:
    """A model whose config maps to the repo's own Python (`auto_map`) for an architecture transformers
    does not have is refused unless the user set trust_remote_code: that code would run on load. (A
    repo that maps a type transformers knows loads with transformers' own classes, its code unread.)
    Said here, in prefalign's words, before transformers refuses with a ValueError about an argument."""
    file = path / "config.json"
    if not file.is_file():
        return
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # not ours to judge: transformers reports a broken config
    if isinstance(config, dict) and config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING:
        raise ModelError(f"{file}: model_type {config.get('model_type')!r} is the repo's own Python code (auto_map), "
                         "which would run when it loads; prefalign runs no such code unless you set "
                         "trust_remote_code: true (read that code first)")


def refuse_pickled_adapter(path: Path) -> Path:
    """PATH, an adapter folder, when its weights are safetensors. PEFT would fall back to
    adapter_model.bin and unpickle it (torch.load); prefalign never does."""
    if not (path / "adapter_model.safetensors").is_file():
        raise ModelError(f"{path}: no adapter_model.safetensors; prefalign never unpickles .bin/.pt files "
                         "(convert the adapter to safetensors first)")
    return path


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    path = _local(path, tokenizer_only=True, code=trust_remote_code)
    kw: dict[str, Any] = {}
    if path.suffix == ".gguf":
        path, kw["gguf_file"] = path.parent, path.name
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kw)
    except OSError as e:  # transformers' word for "not a tokenizer folder"
        raise ModelError(f"{path}: cannot load a tokenizer: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding positions are masked out everywhere
    return tok


# attn_implementation (train/config.py RunConfig): "auto" passes nothing, so transformers picks its
# default for the model (sdpa where the model has it, eager otherwise; Mamba has no attention at all)
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")


def attn_problem(name: str, device: str | torch.device, *, training: bool = False) -> str | None:
    """Why attention implementation `name` cannot run on `device` here (None if it can), checked
    before any weight is read. training: the model will be trained, so it needs a backward pass."""
    device = torch.device(device)
    if name == "flash_attention_2":
        missing = [what for what, ok in (("a CUDA GPU", device.type == "cuda" and torch.cuda.is_available()),
                                         ("the flash_attn package", find_spec("flash_attn") is not None)) if not ok]
        if missing:
            return f"needs {' and '.join(missing)}; use sdpa or flex_attention"
    if name == "flex_attention":
        if find_spec("torch.nn.attention.flex_attention") is None:
            return f"needs torch >= 2.5 (FlexAttention); this is torch {torch.__version__}"
        if training and device.type == "cpu":
            return ("cannot train on CPU: torch's FlexAttention has no backward pass there (forward passes "
                    "run); train on a GPU, or use sdpa")
    return None


def _attention_kwargs(name: str, device: str | torch.device, training: bool) -> dict[str, Any]:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"attn_implementation: {name!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    problem = attn_problem(name, device, training=training)
    if problem:
        raise ConfigError(f"attn_implementation: {name} {problem}")
    return {} if name == "auto" else {"attn_implementation": name}


def _from_pretrained(cls, path: Path, kw: dict[str, Any]):
    try:
        return cls.from_pretrained(str(path), **kw)
    except OSError as e:  # transformers' word for "not a model folder" (no config.json, no weights)
        raise ModelError(f"{path}: cannot load a model: {e}") from None
    except ValueError as e:
        if "attn_implementation" in kw and "attention" in str(e):  # the architecture lacks that kernel
            raise ConfigError(f"attn_implementation: {kw['attn_implementation']}: {str(e).split('. ')[0]}; "
                              "use sdpa (or auto)") from None
        raise


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               device: str | torch.device = "cpu", quantize_4bit: bool = False, attn_implementation: str = "auto",
               training: bool = False):
    """A causal LM from a local folder (safetensors weights) or a .gguf file (dequantised).

    quantize_4bit loads the base in NF4 through bitsandbytes for QLoRA; it needs a CUDA device.
    attn_implementation: one of ATTN_IMPLEMENTATIONS; one that cannot run here is a ConfigError
    (training: the model will be trained, so its attention needs a backward pass on `device`)."""

    path = _local(path, code=trust_remote_code)
    attention = _attention_kwargs(attn_implementation, device, training)
    if (path / "adapter_config.json").exists():
        # a LoRA run's final/: its base with the adapter merged in, so a later run (PPO after DPO)
        # starts from, and is anchored to, what that run produced
        return _merged_adapter(path, dtype, trust_remote_code, attention).to(device)
    # local_files_only: `path` is on disk (a Hub id was fetched by resolve_model, with only safe files)
    kw: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "local_files_only": True,
                          **attention}
    if path.suffix == ".gguf":
        kw["gguf_file"], path = path.name, path.parent
    else:
        if not any(path.glob("*.safetensors")):
            raise ModelError(f"{path}: no *.safetensors weights; prefalign never unpickles .bin/.pt files")
        kw["use_safetensors"] = True
    if quantize_4bit:
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            raise ModelError("quantize_4bit (QLoRA) needs a CUDA device; on this machine train LoRA in fp32/bf16")
        try:  # optional and CUDA-only: checked before any work, imported only for QLoRA
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ModelError("quantize_4bit needs bitsandbytes: pip install bitsandbytes") from None

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
        kw["device_map"] = {"": torch.device(device).index or 0}
        return _from_pretrained(AutoModelForCausalLM, path, kw)
    return _from_pretrained(AutoModelForCausalLM, path, kw).to(device)


def _merged_adapter(adapter: Path, dtype: torch.dtype, trust_remote_code: bool, attention: dict[str, Any]):
    refuse_pickled_adapter(adapter)  # before the base loads
    base = adapter_base(adapter)  # a local folder or a Hub id (at the commit the adapter was trained on)
    model = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code,
                       attn_implementation=attention.get("attn_implementation", "auto"))
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def load_tokenizer_for(path: str | Path, trust_remote_code: bool = False, chat_template: str | None = None):
    """The tokenizer of a model folder, or of an adapter folder's base when the adapter has none;
    `chat_template` (NAME | FILE, data/chat.py) replaces its template when set."""

    path = _local(path, tokenizer_only=True, code=trust_remote_code)
    if (path / "adapter_config.json").exists() and not (path / "tokenizer_config.json").exists():
        path = adapter_base(path)
    return set_chat_template(load_tokenizer(path, trust_remote_code), chat_template)


# gradient_checkpointing: selective. Inside each checkpointed layer the outputs of the matmuls and
# of attention are kept, and only what is cheap to redo is recomputed in backward: elementwise ops
# (norms, activations, RoPE, residual adds, LoRA scaling) and matmuls with an inner dimension of at
# most LORA_RANK_MAX (a LoRA B projection: r multiply-adds per output). The big activation tensors
# that are recomputed (silu(gate), the MLP product, normalised inputs, repeated K/V) are what most
# of a layer's saved memory is. Values and gradients equal the unchecked path (tests/test_checkpointing.py).
LORA_RANK_MAX = 64
_KEEP = ("mm.default", "addmm.default", "bmm.default", "_scaled_dot_product_flash_attention_for_cpu.default",
         "_scaled_dot_product_flash_attention.default", "_scaled_dot_product_efficient_attention.default",
         "_scaled_dot_product_cudnn_attention.default")


def keep_matmuls(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy (torch.utils.checkpoint.create_selective_checkpoint_contexts)."""

    name = str(op).removeprefix("aten.")
    if name in _KEEP and not (name == "mm.default" and args[0].shape[-1] <= LORA_RANK_MAX):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def enable_checkpointing(model, mode: bool | str) -> None:
    """gradient_checkpointing: true (each layer's input kept, the layer recomputed in backward) or
    "selective" (matmul and attention outputs kept as well, only cheap ops recomputed)."""
    if not mode:
        return

    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, keep_matmuls)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def lora_targets(model) -> list[str] | str:
    return LORA_TARGETS.get(getattr(model.config, "model_type", ""), "all-linear")


def add_lora(model, settings: dict[str, Any] | None = None, task_type: str = "CAUSAL_LM"):
    """Wrap the model with PEFT LoRA adapters; `settings` are LoraConfig fields (r, lora_alpha, ...).
    task_type SEQ_CLS (reward models, critics) also trains the new scalar head in full."""

    settings = dict(settings or {})
    settings.setdefault("r", 8)
    settings.setdefault("lora_alpha", 2 * settings["r"])
    settings.setdefault("lora_dropout", 0.0)
    settings.setdefault("target_modules", lora_targets(model))
    if getattr(model.config, "model_type", "") == "gpt2":
        settings.setdefault("fan_in_fan_out", True)  # GPT-2 stores its projections as Conv1D (transposed)
    config = LoraConfig(task_type=task_type, **settings)
    return get_peft_model(model, config)


def weight_dtypes(model) -> str:
    """What the weights are held in, read from the model: "weights bf16 (frozen), fp32 (trained)"."""
    def names(params) -> str:
        found = sorted({str(p.dtype).removeprefix("torch.") for p in params})
        return "/".join(found) or "none"

    params = list(model.parameters())
    frozen = names(p for p in params if not p.requires_grad)
    trained = names(p for p in params if p.requires_grad)
    return f"weights {frozen} (frozen), {trained} (trained)"


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def unwrap(model):
    """The transformers model under a PEFT wrapper (LoRA layers stay in place)."""
    return model.get_base_model() if is_peft(model) else model


def trunk_of(model):
    """The transformers trunk that returns hidden states (LlamaModel, GPT2Model, MambaModel, ...)."""
    hf = unwrap(model)
    trunk = getattr(hf, hf.base_model_prefix, None)
    if trunk is None:
        raise ModelError(f"cannot find the trunk ('{hf.base_model_prefix}') of {type(hf).__name__}")
    return trunk


def position_kwargs(trunk, attention_mask):
    """position_ids from the attention mask (as generation computes them), for trunks that take
    them: a left-padded row then sees the same positions as the unpadded sequence."""

    if "position_ids" not in inspect.signature(trunk.forward).parameters:
        return {}
    return {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}


def hidden_states(model, input_ids, attention_mask):
    """(B, T, H) last hidden states of the trunk, positions from the attention mask (left padding safe)."""
    trunk = trunk_of(model)
    return trunk(input_ids=input_ids, attention_mask=attention_mask,
                 **position_kwargs(trunk, attention_mask)).last_hidden_state


def backbone_and_head(model):
    """(the trunk that returns hidden states, the output projection to the vocabulary)."""
    return trunk_of(model), unwrap(model).get_output_embeddings()


def save_model(model, tokenizer, out: str | Path, base: str | Path | None = None, state_dict=None) -> None:
    """A HF folder (full fine-tune) or a PEFT adapter folder; both in safetensors.

    BASE: the model the run started from. An adapter records it as its base, so that a run started
    from another LoRA run's final/ (iterative DPO, PPO after DPO) saves an adapter whose base is that
    run's adapter: loading it merges the whole chain. PEFT would record the root model's name (the
    merged model keeps its config's name) and silently drop the earlier runs' training.
    STATE_DICT: whole tensors gathered from a sharded (FSDP2) model, whose own are shards."""
    out = Path(out)
    if base is not None and is_peft(model):
        name, revision = base_reference(base)  # a Hub base: its id and the commit it was loaded at
        for peft_cfg in model.peft_config.values():
            peft_cfg.base_model_name_or_path, peft_cfg.revision = name, revision
    # written whole under a temporary name, then renamed: a full disk or a kill never leaves a final/ that
    # loads with half its files; a full disk is a StorageError naming final/ and its size
    tmp = tmp_name(out)
    restore_aside(out)  # a final/ a save killed between its renames left aside
    remove(tmp)  # what a save killed half-way left
    with disk_full(out, lambda: _weights_bytes(model, state_dict), tmp):
        model.save_pretrained(str(tmp), safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        faults.point("final.write", tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        commit(tmp, out)


def _weights_bytes(model, state_dict=None) -> int:
    """What save_model writes, near enough for a disk-full message: the tensors of the weights it saves."""
    if state_dict is None:
        state_dict = {n: p for n, p in model.named_parameters() if p.requires_grad} if is_peft(model) \
            else model.state_dict()
    return sum(t.numel() * t.element_size() for t in state_dict.values())
