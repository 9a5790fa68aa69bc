"""Two runs pointed at one output folder (issue 16 §1): while a run trains there, a second is refused,
naming the owner's PID and host, and loses nothing; a lock left by a process that died (killed, so its
`finally` never ran) is taken over with a warning, so `resume: true` goes on as before; a lock from
another host is never guessed dead. Real processes: a live one holds a lock, a dead one left one."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from conftest import learnable_pairs, write_jsonl
from prefalign.errors import ConfigError
from prefalign.train.lock import LOCK, run_lock
from prefalign.train.methods import make_config
from prefalign.train.run import train


def _lock(out, pid, host=None):
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "then"}))


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_live_run_holds_its_folder_and_the_second_is_refused(tiny_models, tmp_path, sleeper):
    out = tmp_path / "run"
    _lock(out, sleeper)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')  # the live run's: must survive
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(8))
    cfg = make_config(method="dpo", model=str(tiny_models["llama"]), data=str(data), output=str(out), max_steps=1,
                      batch_size=4, kl_every=0)
    with pytest.raises(ConfigError, match=f"in use by PID {sleeper} on {socket.gethostname()}"):
        train(cfg, log=lambda _: None, progress=False)
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'
    assert json.loads((out / LOCK).read_text())["pid"] == sleeper  # still theirs
    with pytest.raises(ConfigError, match="in use by PID"):  # resume too: the owner is still training
        train(cfg.model_copy(update={"resume": True}), log=lambda _: None, progress=False)


def test_a_dead_owners_lock_is_taken_over_with_a_warning_and_released_at_the_end(tiny_models, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out, said = tmp_path / "run", []
    _lock(out, int(dead.stdout))
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(8))
    train(make_config(method="dpo", model=str(tiny_models["llama"]), data=str(data), output=str(out), max_steps=1,
                      batch_size=4, kl_every=0), log=said.append, progress=False)
    assert any(f"left by PID {int(dead.stdout)}, which no longer runs: taking it over" in x for x in said), said
    assert (out / "final").exists() and not (out / LOCK).exists()


def test_another_hosts_lock_is_never_guessed_dead_and_a_failed_run_releases_its_own(tmp_path):
    _lock(tmp_path / "a", 1, host="some-other-host")
    with pytest.raises(ConfigError, match="in use by a run on host some-other-host.*delete"):
        with run_lock(tmp_path / "a"):
            pass
    with pytest.raises(RuntimeError), run_lock(tmp_path / "b"):
        assert json.loads((tmp_path / "b" / LOCK).read_text())["host"] == socket.gethostname()
        raise RuntimeError("the run failed")
    assert not (tmp_path / "b" / LOCK).exists()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / LOCK).write_text('{"pid": 12')  # half-written by a process killed mid-write
    with run_lock(tmp_path / "c", log=lambda _: None):
        pass
    with run_lock(tmp_path / "d", main=False):  # ranks other than 0 hold nothing
        assert not (tmp_path / "d").exists()
