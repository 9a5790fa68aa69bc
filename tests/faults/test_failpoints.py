"""The fail points themselves (prefalign/faults.py): a rule fires at exactly its hit and rank, a kill is a
real SIGKILL, a poisoned loss poisons the gradients through autograd, and a malformed rule is an error."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys

import pytest
import torch

from prefalign import faults


def test_fires_at_its_hit_only(monkeypatch):
    monkeypatch.setenv(faults.ENV, "oom@a#3,nospace@b#2+")
    faults.point("a")
    faults.point("a")
    with pytest.raises(MemoryError, match="a"):
        faults.point("a")
    faults.point("a")  # the 4th hit: the rule was for the 3rd only
    faults.point("b", "x.bin")
    for _ in range(3):  # "+": the 2nd and every later hit
        with pytest.raises(OSError) as e:
            faults.point("b", "x.bin")
        assert e.value.errno == errno.ENOSPC and e.value.filename == "x.bin"


def test_rank_and_reset(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(faults.ENV, "oom@a#1@rank1")
    faults.point("a")  # rank 0: the rule is rank 1's
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(faults.ENV, "oom@a#1@rank1 ")  # a new value: the counts start over
    with pytest.raises(MemoryError):
        faults.point("a")


def test_poison_keeps_the_graph(monkeypatch):
    w = torch.ones(3, requires_grad=True)
    monkeypatch.setenv(faults.ENV, "nan@loss#2")
    assert faults.poison("loss", (w * 2).sum()).isfinite()
    loss = faults.poison("loss", (w * 2).sum())
    loss.backward()
    assert loss.isnan() and w.grad.isnan().all()
    monkeypatch.setenv(faults.ENV, "inf@grad#1")
    w.grad = torch.zeros(3)
    faults.poison_grads("grad", [torch.zeros(1, requires_grad=True), w])  # the first with a gradient
    assert w.grad[0] == float("inf") and w.grad[1:].eq(0).all()
    assert faults.poison("other", 1.5) == 1.5


def test_kill_is_sigkill(tmp_path):
    code = "from prefalign import faults\nfaults.point('x')\nfaults.point('y')\nfaults.point('x')\nprint('survived')"
    trace = tmp_path / "hits.txt"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**__import__("os").environ, faults.ENV: "kill@x#2", faults.TRACE: str(trace)})
    assert r.returncode == -signal.SIGKILL and "survived" not in r.stdout
    assert trace.read_text() == "x#1 rank0\ny#1 rank0\nx#2 rank0\n"  # the hit that killed it is on record


@pytest.mark.parametrize("bad", ["boom@x", "kill", "kill@#1", "kill@x#0", "kill@x#a", "kill@x@rankz"])
def test_malformed_rule_is_an_error(monkeypatch, bad):
    monkeypatch.setenv(faults.ENV, bad)
    with pytest.raises(ValueError, match=faults.ENV):
        faults.point("x")
