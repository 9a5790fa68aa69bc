"""The `prefalign` command line: thin wrappers that build a typed config and call the library.

Each command imports the layer it calls when it runs, not at module top: importing every layer (torch,
transformers, peft) costs seconds of CPU that `prefalign --help` or `prefalign data check` should not
pay. Errors: a `PrefalignError` is printed as one line (exit 2 for config/data/model, 1 for a failed
run); anything else keeps its traceback (`--debug` shows it for PrefalignErrors too).
"""

from __future__ import annotations

import sys

from rich.markup import escape

from ..errors import PrefalignError
from . import audit, card, commands, export, review, serve, version  # noqa: F401  (register their commands on `app`)
from .base import app, console, out


def _method_help(argv: list[str]) -> str | None:
    """`prefalign train --method NAME --help`: NAME's keys (typer's help cannot depend on an option)."""
    if len(argv) < 2 or argv[0] != "train" or not {"--help", "-h"} & set(argv):
        return None
    name = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--method"), None)
    name = name or next((a.partition("=")[2] for a in argv if a.startswith("--method=")), None)
    if name is None:
        return None
    from ..train.help import config_help

    return config_help(name)


def main() -> None:
    import os

    # prefalign draws its own progress; transformers' per-load bars would bury it
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # a TAB press (shell completion), --version and `data ...` (no model; a tokenizer at most, which loads no
    # bars) answer without importing transformers: a second or two of CPU and ~40 MB of a data command's RSS
    if ("_PREFALIGN_COMPLETE" not in os.environ and not {"--version", "-V"} & set(sys.argv[1:])
            and sys.argv[1:2] != ["data"]):
        try:  # transformers' own per-load bars (the import is paid once, by every command that loads a model)
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        if (text := _method_help(sys.argv[1:])) is not None:
            # the method's keys, then typer's usage of `train` (its flags and arguments)
            out.print(text + "\n", markup=False, highlight=False)
            sys.argv[1:] = ["train", "--help"]
        app(prog_name="prefalign")  # also under `python -m prefalign`: usage lines and shell completion's name
    except PrefalignError as e:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)  # "[..." in e is text
        sys.exit(e.exit_code)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)  # "[..." in e is text
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
