"""`prefalign card RUN`: a run's model card (final/README.md), and the card every training command
writes when its runs end. The card is written here, by the commands that orchestrate training, because
train/ may not import report/ (the layers import downward only)."""

from __future__ import annotations

import json
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


def record_command(run: str | Path) -> None:
    """run.json's `command`: the command line that started the run, as this process was given it."""
    path = Path(run) / "run.json"
    summary = json.loads(path.read_text())
    summary["command"] = shlex.join(["prefalign", *sys.argv[1:]])
    path.write_text(json.dumps(summary, indent=2))


def write_model_card_after_training(run: str | Path) -> None:
    """The end of a training command: run.json's `command`, then final/README.md (with the data measured
    afresh). One process writes it: the main one, or rank 0 of the processes a launcher started."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from ..report.card import write_card

    record_command(run)
    _log(f"model card -> {write_card(run, fresh_stats=True)}")
