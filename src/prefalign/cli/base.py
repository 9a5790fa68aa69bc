"""The app, its sub-apps and what every command shares: error printing, config building, logging."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from ..config import StrictModel, load_config

app = typer.Typer(no_args_is_help=True,  # typer's --install-completion / --show-completion: docs/install.md
                  help="Align language models to preference data: DPO family and RLHF, measured side by side. "
                       "`prefalign --debug COMMAND ...` shows the traceback of any error.")
data_app = typer.Typer(no_args_is_help=True, help="Check, describe, curate and split preference data.")
app.add_typer(data_app, name="data")

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

FORMAT_HELP = "record shape: auto, pairs, conversation, hh, sharegpt, kto, sft, ranked"  # data/shapes.py SHAPES
READER_HELP = "file type: auto, jsonl, json, csv, parquet, arrow (a datasets.save_to_disk folder)"


def fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def build(model: type[StrictModel], options: dict[str, Any], overrides: list[str] | None,
          config: Path | None = None) -> Any:
    """Options given on the command line, then the YAML file, then key=value overrides."""
    base = {k: v for k, v in options.items() if v is not None}
    return load_config(model, config, list(overrides or []), base=base)


def _read_options(format: str, reader: str, split: str | None, ranked: str) -> dict[str, Any]:
    return {"format": format, "reader": reader, "split": split, "ranked": ranked}


def _config_and_overrides(args: list[str] | None) -> tuple[Path | None, list[str]]:
    args = list(args or [])
    return (Path(args.pop(0)) if args and "=" not in args[0] else None), args


def _log(message: str) -> None:
    console.print(message, highlight=False, markup=False)
