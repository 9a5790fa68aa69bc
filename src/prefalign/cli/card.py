"""`prefalign card RUN`: a run's model card (final/README.md), and what every training command does when
its runs end (api.finish_run: the command line in run.json, the card, push_to_hub's upload). That is done
above train/, which may not import report/ (the layers import downward only)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import typer

from .base import _log, app, console


@app.command("card")
def card_cmd(
    run: Path = typer.Argument(..., help="a training run folder (config.yaml, run.json, final/)"),
    eval_dir: Path | None = typer.Option(None, "--eval", help="an evaluation of RUN/final (its eval.json); "
                                         "default: RUN/eval.json or RUN/eval/eval.json when there is one"),
    output: Path | None = typer.Option(None, "-o", "--output", help="where it goes (default RUN/final/README.md)"),
) -> None:
    """Write (again) RUN/final/README.md, the model card: method, hyperparameters, data statistics, the
    evaluation, cost, the command that reproduces the run and the method's paper; after a later eval, rerun."""
    from ..report.card import write_card

    path = write_card(run, eval_dir=eval_dir, output=output)
    console.print(f"model card -> {path}", highlight=False)


def command_line() -> str:
    """The command line that started this training, as run.json's `command` records it: under
    `--nproc` the processes get the parent's (with --nproc) through PREFALIGN_COMMAND."""
    return os.environ.get("PREFALIGN_COMMAND") or shlex.join(["prefalign", *sys.argv[1:]])


def write_model_card_after_training(run: str | Path) -> None:
    """The end of a training command (recipe stages, iterate rounds): run.json's `command`, the model
    card, then push_to_hub's upload (api.finish_run; one process does it)."""
    from ..api import finish_run

    finish_run(run, command=command_line(), log=_log)
