"""A folder replacing one of its name (storage.replace_folder: final/ saved again by a resume, a checkpoint of
the same step saved again) killed between its two renames: a complete folder is left, at its name or aside,
and the next save (or resume) puts it back, never a run folder with no final/ (issue 16, §1). The kill is
the kernel's SIGKILL at the `folder.replace` fail point, in a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from faultkit import tally
from safetensors.torch import load_file

from prefalign import faults
from prefalign.errors import StorageError
from prefalign.models.load import load_model, load_tokenizer, save_model
from prefalign.storage import aside_name

KIND = "kill (SIGKILL)"
SAVE_TWICE = """
import sys, torch
from prefalign.models.load import load_model, load_tokenizer, save_model
model, tok = load_model(sys.argv[1]), load_tokenizer(sys.argv[1])
save_model(model, tok, sys.argv[2])  # no final/ there yet: nothing to put aside
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
save_model(model, tok, sys.argv[2])  # killed at folder.replace
"""
FOLDERS = """
import sys
from pathlib import Path
from prefalign.storage import replace_folder
out = Path(sys.argv[1]) / "checkpoints"
tmp = out / "step-4.tmp"
tmp.mkdir()
(tmp / "state.json").write_text("new")
replace_folder(tmp, out / "step-4")  # killed at folder.replace
"""


def _killed(script: str, *args: str) -> int:
    env = {**os.environ, faults.ENV: "kill@folder.replace#1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script, *args], env=env, timeout=300).returncode


def test_final_killed_between_its_renames_is_put_back(tiny_models, tmp_path, monkeypatch):
    model_dir, final = tiny_models["llama"], tmp_path / "final"
    rc = _killed(SAVE_TWICE, str(model_dir), str(final))
    aside = aside_name(final).is_dir() and not final.exists()
    # the next save fails (a full disk before its rename): the first save's final/ must be back all the same
    monkeypatch.setenv(faults.ENV, "nospace@final.write#1")
    faults.reset()
    with pytest.raises(StorageError):
        save_model(load_model(model_dir), load_tokenizer(model_dir), final)
    monkeypatch.delenv(faults.ENV)
    faults.reset()
    problems = [] if rc == -signal.SIGKILL else [f"exit status {rc}, not SIGKILL"]
    problems += [] if aside else ["the kill did not come between the renames (no final/, the old one aside)"]
    weights = final / "model.safetensors"
    if not weights.is_file():
        problems.append(f"no complete final/ after the kill and a failed save: {sorted(os.listdir(tmp_path))}")
    else:
        saved, first = load_file(str(weights)), load_model(model_dir).state_dict()
        if not all(torch.equal(t, first[k]) for k, t in saved.items()):
            problems.append("final/ is not the first save's")
    tally(KIND, survived=not problems, lost=int(bool(problems)), detail="final/ between its renames")
    assert not problems, problems


def test_a_checkpoint_saved_again_killed_between_its_renames_is_put_back(tmp_path):
    from prefalign.train.checkpoint import remove_stale_saves

    old = tmp_path / "checkpoints" / "step-4"
    old.mkdir(parents=True)
    (old / "state.json").write_text("old")
    rc = _killed(FOLDERS, str(tmp_path))
    between = not old.exists() and aside_name(old).is_dir()
    remove_stale_saves(tmp_path)  # what a resume and a save do first
    problems = [] if rc == -signal.SIGKILL else [f"exit status {rc}, not SIGKILL"]
    problems += [] if between else ["the kill did not come between the renames"]
    if not (old / "state.json").is_file() or (old / "state.json").read_text() != "old":
        problems.append(f"checkpoints/step-4 is not back whole: {sorted(os.listdir(old.parent))}")
    if aside_name(old).exists() or (old.parent / "step-4.tmp").exists():
        problems.append(f"left behind: {sorted(os.listdir(old.parent))}")
    tally(KIND, survived=not problems, lost=int(bool(problems)), detail="a checkpoint between its renames")
    assert not problems, problems
