"""`prefalign export`: a run's final/ as a plain HF folder or a GGUF file, for serving elsewhere."""

from __future__ import annotations

from pathlib import Path

import typer

from .base import app, console


@app.command("export")
def export(final: Path = typer.Argument(..., help="a run's final/ folder (a LoRA adapter or a full fine-tune), or a "
                                                   "Hub id org/name or org/name@revision"),
           output: Path = typer.Option(..., "-o", "--output", help="folder to write into"),
           format: str = typer.Option("hf", "--format",
                                      help="hf: merged safetensors folder (transformers, vLLM); "
                                           "gguf: one unquantised file (llama.cpp, Ollama)"),
           dtype: str = typer.Option("auto", "--dtype",
                                     help="auto (the type the weights were saved in), float32, float16, bfloat16")
           ) -> None:
    """Export a run's final/ for serving elsewhere: LoRA merged into its base, tokenizer and chat template kept."""
    from ..models.export import export as run_export

    written = run_export(final, output, format, dtype)
    console.print(f"exported ({format}) -> {written}", highlight=False)
