"""What a model folder may do to the machine that loads it: nothing, unless the user says so. A repo's
own Python (config.json's auto_map for an architecture transformers lacks) is refused by default, in
prefalign's words, and never runs; a repo that maps a type transformers knows loads with transformers'
own classes, its code unread."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CODE = """from pathlib import Path
Path(__file__).with_name("RAN").write_text("the repo's code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil-llama"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def _with_code(src, dst, model_type: str):
    folder = shutil.copytree(src, dst)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                                   "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(CODE)
    return folder


def test_a_folder_with_its_own_code_is_refused_and_its_code_never_runs(tiny_models, tmp_path):
    from prefalign.errors import ModelError
    from prefalign.models.load import load_model, load_tokenizer_for
    from prefalign.models.scalar import load_scalar_model

    folder = _with_code(tiny_models["llama"], tmp_path / "custom", "evil-llama")
    for load in (load_model, load_tokenizer_for, load_scalar_model):
        with pytest.raises(ModelError, match="repo's own Python code.*trust_remote_code: true"):
            load(folder)
    cli = subprocess.run([sys.executable, "-m", "prefalign", "train", "--method", "sft", "--model", str(folder),
                          "--data", str(folder / "config.json"), "-o", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "trust_remote_code: true" in cli.stdout + cli.stderr, cli.stderr[-2000:]
    assert not (folder / "RAN").exists() and not (tmp_path / "run" / "final").exists()


def test_a_known_architecture_with_an_auto_map_loads_without_its_code(tiny_models, tmp_path):
    from prefalign.models.load import load_model

    folder = _with_code(tiny_models["llama"], tmp_path / "mapped", "llama")
    assert type(load_model(folder)).__name__ == "LlamaForCausalLM" and not (folder / "RAN").exists()


def test_a_lora_adapter_saved_as_a_pickle_is_refused_not_unpickled(tmp_path):
    """PEFT falls back to adapter_model.bin (torch.load) where a folder has no safetensors: refused before
    any weights load, by every path that attaches adapters (load_model merges them, serve attaches them)."""
    import torch
    from safetensors.torch import load_file, save_file

    from prefalign.errors import ModelError
    from prefalign.models.load import add_lora, load_model, load_tokenizer, save_model
    from prefalign.models.scalar import load_scalar_model
    from prefalign.serve.models import load_served

    shipped = Path(__file__).resolve().parent.parent / "src" / "prefalign" / "assets" / "imdb-lm"
    final = tmp_path / "final"
    save_model(add_lora(load_model(shipped), {"r": 2}), load_tokenizer(shipped), final, base=str(shipped))
    torch.save(load_file(final / "adapter_model.safetensors"), final / "adapter_model.bin")  # what PEFT would read
    (final / "adapter_model.safetensors").unlink()
    # a reward model's folder too; a stray *.safetensors beside the .bin must not let it through
    save_file({"x": torch.zeros(1)}, str(final / "stray.safetensors"))
    for load in (load_model, lambda f: load_served([str(f)], torch.device("cpu")), load_scalar_model):
        with pytest.raises(ModelError, match="no adapter_model.safetensors; prefalign never unpickles"):
            load(final)
