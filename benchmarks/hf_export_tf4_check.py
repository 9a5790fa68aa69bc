"""`prefalign export --format hf` loaded by transformers 4.x, as vLLM installs often pin it.

    python benchmarks/hf_export_tf4_check.py --tf4 DIR [--work DIR] [--out benchmarks/results/hf-export-tf4-check.json]

DIR is a folder with transformers 4.x (and the tokenizers/huggingface_hub it needs) installed into it, e.g.
`pip install --target DIR "transformers==4.57.1"`; it is put on PYTHONPATH of a second Python process that
imports no prefalign. prefalign trains and exports under transformers 5. For each model this exports the hf
folder, then in the 4.x process loads it with AutoModelForCausalLM / AutoTokenizer and compares with the
model prefalign runs (5.x, in process, an adapter applied unmerged): the largest logit gap over the prompts,
whether the token ids and the rendered chat template are equal, and the rope_theta 4.x sees. The same folder
with the keys only 5.x knows (what export wrote before it added the 4.x spellings) is loaded too, as
`without_legacy_keys`, to show what those keys change.

Models: tiny llama (rope_theta 1e6), tiny llama with linear RoPE scaling, tiny qwen2, mistral, gpt2, mamba,
a LoRA run on the rope_theta-1e6 llama, the shipped IMDB model, and SmolLM2-135M-Instruct (rope_theta 1e5)
when the folder `benchmarks/gguf_export_check.py` converts is in --work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIPPED = HERE.parent / "src" / "prefalign" / "assets"
CHAT = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]


def prompts(n: int = 4) -> list[str]:
    rows = (SHIPPED / "imdb_prefixes.jsonl").read_text().splitlines()[:n]
    return [json.loads(r)["prompt"] for r in rows]


def _sources(work: Path, texts: list[str]) -> dict[str, tuple[Path, Path | None]]:
    """name -> (the folder export reads, the base an adapter is applied to in process, or None)."""
    import torch

    from prefalign.models.load import add_lora, load_model, load_tokenizer, save_model
    from prefalign.models.tiny import build_tokenizer, save_tiny

    tok = build_tokenizer(texts * 20 + [json.dumps(CHAT)] * 5, vocab_size=400)
    tiny = {"llama_theta_1e6": ("llama", {"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}),
            "llama_linear_scaled": ("llama", {"rope_parameters": {"rope_theta": 5e5, "rope_type": "linear",
                                                                  "factor": 2.0}}),
            "qwen2": ("qwen2", {"vocab_size": 416}), "mistral": ("mistral", {}), "gpt2": ("gpt2", {}),
            "mamba": ("mamba", {})}
    out = {}
    for name, (arch, kw) in tiny.items():
        out[name] = (save_tiny(work / f"tiny-{name}", arch, tok, hidden=32, initializer_range=0.3, **kw), None)
    base = out["llama_theta_1e6"][0]
    torch.manual_seed(1)
    model = add_lora(load_model(base), {"r": 4})
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(std=0.2)
    save_model(model, load_tokenizer(base), work / "lora-run" / "final", base=base)
    out["lora_on_llama_theta_1e6"] = (work / "lora-run" / "final", base)
    out["shipped_imdb_lm"] = (SHIPPED / "imdb-lm", None)
    if (work / "smollm2" / "config.json").exists():
        out["smollm2_135m"] = (work / "smollm2", None)
    return out


def five_side(work: Path, texts: list[str]) -> dict:
    """Export every model and record what prefalign's in-process model gives (logits, ids, chat text)."""
    import numpy as np
    import torch
    from peft import PeftModel

    from prefalign.models.export import export
    from prefalign.models.load import load_model, load_tokenizer_for

    cases = {}
    for name, (source, base) in _sources(work, texts).items():
        shutil.rmtree(work / f"{name}-hf", ignore_errors=True)  # an earlier run's export
        folder = export(source, work / f"{name}-hf", "hf", "float32")
        legacy_free = work / f"{name}-hf-without-legacy-keys"
        _strip_legacy(folder, legacy_free)
        model = PeftModel.from_pretrained(load_model(base), str(source)).eval() if base else load_model(source)
        tokenizer = load_tokenizer_for(source)
        ids = [tokenizer(t)["input_ids"] for t in texts]
        with torch.no_grad():
            logits = [model(torch.tensor([i])).logits[0].float().numpy() for i in ids]
        np.savez(work / f"{name}-ref.npz", *logits)
        chat = tokenizer.apply_chat_template(CHAT, tokenize=False) if tokenizer.chat_template else None
        cases[name] = {"folder": str(folder), "without_legacy_keys": str(legacy_free), "ids": ids, "chat": chat,
                       "rope_theta_trained": _theta(model)}
    return cases


def _theta(model) -> float | None:
    rope = getattr(model.config, "rope_parameters", None) or {}
    return rope.get("rope_theta")


def _strip_legacy(folder: Path, dest: Path) -> None:
    """A copy of the export without the 4.x spellings: what export wrote before it added them."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    for weights in folder.glob("*.safetensors"):
        (dest / weights.name).symlink_to(weights.resolve())
    config = json.loads((dest / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling", "torch_dtype", "partial_rotary_factor"):
        config.pop(key, None)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_config = json.loads((dest / "tokenizer_config.json").read_text())
    if tokenizer_config.get("tokenizer_class") == "PreTrainedTokenizerFast":
        tokenizer_config["tokenizer_class"] = "TokenizersBackend"
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def four_side(work: Path, texts: list[str]) -> None:
    """Runs under transformers 4.x (no prefalign import): load each folder, compare with the 5.x records."""
    # the environment's `kernels` package (for 5.x) needs a newer huggingface_hub than 4.x's: hidden, so 4.x's
    # Mamba takes its PyTorch path as it does where `kernels` is not installed
    sys.modules["kernels"] = None
    import numpy as np
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cases = json.loads((work / "cases.json").read_text())
    result = {"transformers": transformers.__version__}
    for name, case in cases.items():
        ref = np.load(work / f"{name}-ref.npz")
        row = {}
        for kind in ("folder", "without_legacy_keys"):
            folder = case[kind]
            config = AutoConfig.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            with torch.no_grad():
                gap = max(float(np.abs(model(torch.tensor([i])).logits[0].float().numpy() - ref[f"arr_{k}"]).max())
                          for k, i in enumerate(case["ids"]))
            entry = {"rope_theta_seen": getattr(config, "rope_theta", None),
                     "rope_scaling_seen": getattr(config, "rope_scaling", None), "max_logit_gap": gap}
            try:
                tok = AutoTokenizer.from_pretrained(folder)
                entry["tokenizer_class"] = type(tok).__name__
                entry["token_ids_equal"] = [tok(t)["input_ids"] for t in texts] == case["ids"]
                if case["chat"] is not None:
                    entry["chat_template_equal"] = tok.apply_chat_template(CHAT, tokenize=False) == case["chat"]
            except Exception as e:  # what a user of 4.x would see
                entry["tokenizer_error"] = f"{type(e).__name__}: {str(e)[:160]}"
            row[kind] = entry
        row["rope_theta_trained"] = case["rope_theta_trained"]
        result[name] = row
    (work / "tf4-result.json").write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tf4", help="folder holding transformers 4.x (put on PYTHONPATH of the 4.x process)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "prefalign-gguf-check"))
    ap.add_argument("--out", default=str(HERE / "results" / "hf-export-tf4-check.json"))
    ap.add_argument("--side", choices=("5", "4"), default="5", help=argparse.SUPPRESS)
    a = ap.parse_args()
    work, texts = Path(a.work), prompts()
    if a.side == "4":
        return four_side(work, texts)
    import transformers

    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cases = five_side(work, texts)
    (work / "cases.json").write_text(json.dumps(cases))
    env = dict(os.environ, PYTHONPATH=a.tf4)
    subprocess.run([sys.executable, __file__, "--side", "4", "--work", str(work)], env=env, check=True,
                   cwd=tempfile.gettempdir())  # not the repository root: no prefalign, no 5.x on the path
    result = json.loads((work / "tf4-result.json").read_text())
    result["exported_under_transformers"] = transformers.__version__
    result["prompts"] = len(texts)
    result["seconds"] = round(time.time() - started, 1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    result["command"] = f"python benchmarks/hf_export_tf4_check.py --tf4 DIR (transformers {result['transformers']}" \
                        f" in DIR; commit {commit})"
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
