"""A fork server for the kill matrix (test_kill.py): one process pays the import of torch, transformers,
peft and prefalign once (about 5 s here), then forks a fresh child per run, which runs the real command
line (`prefalign train CONFIG key=value ...`, prefalign.cli.main) with its own environment
(PREFALIGN_FAULTS) and output, and can be SIGKILLed by a fail point or from outside like any process.

The server itself only imports: it computes nothing, starts no thread and draws no random number, so
each child starts in the state of a freshly started `prefalign` process (the seed is set by the run).

Protocol, one JSON object a line: the parent writes {"argv": [...], "env": {...}, "log": PATH,
"hits": PATH or null}; the server answers {"pid": PID} as soon as the child runs; the parent writes
{"reap": PID} when it has done with the PID (sent its SIGKILL, or not), and the server answers {"pid":
PID, "rc": RC} once the child ended (RC: the exit status, or minus the signal that ended it: -9 for SIGKILL).
`hits`: where the child writes how often it reached each fail point (prefalign.faults counts them
whenever PREFALIGN_FAULTS has a rule), read by the matrix to aim its kills at hits that happen."""

from __future__ import annotations

import json
import os
import sys

# what a training command imports lazily, imported here once: a child only forks and runs
import peft  # noqa: F401
import transformers.models.gpt2.modeling_gpt2  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
from torch.utils import tensorboard  # noqa: F401

import prefalign.api  # noqa: F401
import prefalign.cli
import prefalign.judges.sentiment  # noqa: F401
import prefalign.train.run  # noqa: F401
from prefalign import faults


def _child(job: dict) -> None:
    """In the forked child: the command with its environment, output to the job's log; never returns."""
    code = 1
    try:
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(job["env"])
        sys.argv = ["prefalign", *job["argv"]]
        try:
            prefalign.cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if job.get("hits"):
            with open(job["hits"], "w") as f:
                json.dump(faults._hits, f)
    except BaseException:  # anything that escaped: on record in the log, and a failed exit status
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no atexit of the server's, no flush of its buffers twice


def main() -> None:
    answer = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            answer.close()
            _child(job)
        answer.write(json.dumps({"pid": pid}) + "\n")
        answer.flush()
        # reaped only when the parent asks (its next line): until then a child that ended stays a zombie,
        # so its PID is not reused and a SIGKILL the parent sends it can never reach another process
        sys.stdin.readline()
        _, status = os.waitpid(pid, 0)
        answer.write(json.dumps({"pid": pid, "rc": os.waitstatus_to_exitcode(status)}) + "\n")
        answer.flush()
    os._exit(0)  # nothing to clean up: skip the seconds an interpreter with torch loaded takes to tear down


if __name__ == "__main__":
    main()
