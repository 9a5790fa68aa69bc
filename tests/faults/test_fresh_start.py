"""A fresh start (`resume: false`) in a folder that holds an earlier run's checkpoints is refused, naming
the folder and the ways on, with nothing in the folder touched (docs/reliability.md, "Checkpoints"):
left in place, the old checkpoints would mix with the new run's (a later `resume: true` could take the
old run's newest step; `keep_checkpoints` would delete the new run's first)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from prefalign.api import train
from prefalign.errors import ConfigError


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_fresh_start_over_an_earlier_runs_checkpoints_is_refused(tiny_models, pair_file, tmp_path, monkeypatch,
                                                                    capsys):
    out = tmp_path / "run"
    cfg = dict(method="dpo", model=str(tiny_models["llama"]), data=str(pair_file), output=str(out), max_steps=2,
               batch_size=2, save_every=1, kl_every=0, report_to=["none"], reference="precompute")
    train(cfg, log=lambda _: None, progress=False, card=False)
    before = _snapshot(out)
    assert {"checkpoints/step-1/state.json", "checkpoints/step-2/state.json"} <= set(before)

    with pytest.raises(ConfigError) as refused:  # the same command again, say with another learning rate
        train({**cfg, "learning_rate": 1e-4}, log=lambda _: None, progress=False, card=False)
    ckpts = out / "checkpoints"
    assert str(refused.value) == (
        f"{ckpts} holds an earlier run's checkpoints (step-1 to step-2) and this run starts afresh (resume: false): "
        f"resume: true continues that run; to start over, move them away (mv {ckpts} {ckpts}.old) or give another "
        "output folder")
    assert _snapshot(out) == before  # config.yaml, metrics.jsonl, the checkpoints, final/: as they were

    from prefalign.cli import main  # the CLI: one line, exit 2 (a usage problem), before any model loads

    monkeypatch.setattr(sys, "argv", ["prefalign", "train", "--method", "dpo", "--model", str(tiny_models["llama"]),
                                      "--data", str(pair_file), "-o", str(out), "--no-progress", "max_steps=2",
                                      "report_to=none"])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and [x for x in err.splitlines() if x.startswith("error:")] == [
        f"error: {refused.value}"], err
    assert _snapshot(out) == before

    ckpts.rename(out / "checkpoints.old")  # what the message says: then the fresh start runs, into its own
    train({**cfg, "max_steps": 1}, log=lambda _: None, progress=False, card=False)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-1"]
