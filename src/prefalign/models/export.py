"""`prefalign export`: a run's final/ -> what other servers load.

hf: one plain HF folder (safetensors, tokenizer with its chat template, generation_config.json) that
transformers and vLLM load with no adapter and no prefalign; gguf: one file for llama.cpp and Ollama
(to_gguf.py). Both start from `merged` (merge.py): a LoRA adapter is merged into its base in fp32,
a full fine-tune loads in the type it was saved in; then the weights are cast to the type asked for.
Everything that refuses an export is checked before the weights are loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig

from ..data.hub import parse_hub_id
from ..errors import ModelError
from .hub import adapter_base, resolve_model
from .load import load_tokenizer_for
from .merge import merged, save_merged
from .to_gguf import GGUF_DTYPES, check_gguf, write_gguf

FORMATS = ("hf", "gguf")
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_GGUF_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def _root(path: Path) -> Path:
    """A model folder itself, or the model at the root of an adapter's chain of bases (a folder or a .gguf)."""
    seen = set()
    while (path / "adapter_config.json").exists() and path not in seen:
        seen.add(path)
        path = resolve_model(adapter_base(path), tokenizer_only=True)  # a Hub base: its config is enough here
    if not (path / "config.json").exists() and path.suffix != ".gguf":
        raise ModelError(f"{path}: no config.json (not a model folder)")
    return path


def _source_config(final: Path):
    root = _root(final)
    if root.suffix == ".gguf":
        return AutoConfig.from_pretrained(str(root.parent), gguf_file=root.name, local_files_only=True)
    return AutoConfig.from_pretrained(str(root), local_files_only=True)


def stored_dtype(final: str | Path) -> str:
    """The type the weights were saved in (a LoRA run: its base's; a GGUF base is dequantised to fp32),
    the default of --dtype auto."""
    root = _root(Path(final))
    if root.suffix == ".gguf":
        return "float32"
    cfg = json.loads((root / "config.json").read_text())
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in DTYPES else "float32"


def _check_source(final: Path, out: Path) -> None:
    if not final.exists():  # neither a local folder nor a Hub id (resolve_model fetched an id's snapshot)
        raise ModelError(f"no such folder: {final}")
    if not final.is_dir():
        raise ModelError(f"{final}: export takes a run's final/ folder (a .gguf file: `prefalign convert` first)")
    if out.resolve() == final.resolve():
        raise ModelError(f"{out}: the output folder is the model being exported; choose another")
    adapter = final / "adapter_config.json"
    if adapter.exists():
        task = json.loads(adapter.read_text()).get("task_type")
        if task not in (None, "CAUSAL_LM"):
            raise ModelError(f"{final}: a {task} adapter (a reward model or critic), not a language model")
        return
    archs = _source_config(final).architectures or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ModelError(f"{final}: {archs[0]} is not a causal LM (a reward model's final/ is already a plain HF "
                         "folder that transformers loads); export serves language models")


def _generation_config(model, tokenizer) -> None:
    """generation_config.json with the tokenizer's special tokens: servers stop on its eos_token_id."""
    gen = model.generation_config or GenerationConfig.from_model_config(model.config)
    for kind in ("bos", "eos", "pad"):
        if getattr(gen, f"{kind}_token_id", None) is None:
            setattr(gen, f"{kind}_token_id", getattr(tokenizer, f"{kind}_token_id"))
    model.generation_config = gen


def export_hf(final: Path, out: Path, dtype: str) -> Path:
    if (out / "config.json").exists() or any(out.glob("*.safetensors")):
        raise ModelError(f"{out}: already holds a model; export into a new or empty folder")
    model, tokenizer = merged(final)
    _generation_config(model, tokenizer)
    save_merged(model.to(DTYPES[dtype]), tokenizer, out)
    if not (out / "generation_config.json").exists():  # written by save_pretrained for models that generate
        model.generation_config.save_pretrained(str(out))
    return out


def export_gguf(final: Path, out: Path, dtype: str, name: str | None = None) -> Path:
    if dtype not in GGUF_DTYPES:
        raise ModelError(f"--dtype {dtype}: GGUF export writes {', '.join(GGUF_DTYPES)}")
    # what the writer cannot do is refused before any weight is read (a LoRA adapter keeps its base's config)
    tokenizer = load_tokenizer_for(final)
    check_gguf(_source_config(final), tokenizer, final)
    path = out / f"model-{_GGUF_SUFFIX[dtype]}.gguf"
    if path.exists():
        raise ModelError(f"{path}: already exists; export into a new folder or remove it")
    model, _ = merged(final)
    out.mkdir(parents=True, exist_ok=True)
    name = name or (final.parent.name if final.name == "final" else final.name)
    return write_gguf(model, tokenizer, path, dtype=dtype, name=name, source=final)


def export(final: str | Path, out: str | Path, fmt: str = "hf", dtype: str = "auto") -> Path:
    """Export a run's final/ (a LoRA adapter or a full fine-tune) as FMT into the folder OUT; returns what
    was written (the folder for hf, the .gguf file for gguf). dtype auto: the type the weights were saved in."""
    # a Hub id exports too (its snapshot in the cache); the GGUF's name is then the repo's, not the commit's
    ref = None if Path(final).exists() else parse_hub_id(final)
    final, out = resolve_model(final), Path(out)
    if fmt not in FORMATS:
        raise ModelError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    _check_source(final, out)
    dtype = stored_dtype(final) if dtype == "auto" else dtype
    if fmt == "hf":
        return export_hf(final, out, dtype)
    return export_gguf(final, out, dtype, ref.repo_id.rpartition("/")[2] if ref else None)
