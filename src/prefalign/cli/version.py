"""The root's own options: `prefalign --version` (typer's --install-completion and --show-completion sit beside it)."""

from __future__ import annotations

import platform
from importlib import metadata

import typer

from .. import __version__
from .base import app, out


def version_line() -> str:
    """prefalign's version, and those of what it computes with, read from their metadata (nothing is
    imported: `--version` answers in the time the CLI takes to start)."""
    found = []
    for dist in ("torch", "transformers", "peft"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"{dist} missing")
    return f"prefalign {__version__} ({', '.join(found)}, python {platform.python_version()})"


def _print_version(value: bool) -> None:
    if value:
        out.print(version_line(), markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=_print_version,
                                      help="print prefalign's version (and torch's, transformers', peft's) and exit"),
         ) -> None:
    """The root's options (the app's help text is its own: cli/base.py)."""
