"""Killed runs (issue 16 §1): SIGKILL a training run at a seeded moment, resume it with `resume=true`,
and the completed run is the run that was never interrupted: the same metrics.jsonl rows (every
value to 1e-6, steps once each) and the same final/ (the same files, the tensors equal exactly).

The matrix: trainer (dpo, sft, reward, ppo, rloo) x variant (full, lora) x moment, each moment a fail
point (prefalign/faults.py: a step, a backward, an optimizer step, an eval batch, a reference precompute
batch, the reference cache's write, a checkpoint's files or its commit, a metrics row, final/, an RL
rollout) at a seeded hit among those an uninterrupted run reaches, or a SIGKILL sent from outside at a
seeded delay after the first checkpoint appears (a fail point is only where we thought to put one), or
twice: at a fail point, then the resume killed too at one of the steps it had left.
A kill inside a checkpoint save must leave that save uncommitted and the previous checkpoint intact
and chosen; a kill in the reference precompute leaves its cache absent or whole.

Each run is a real `prefalign train ...` process, forked from a server that imported torch once
(forkserver.py): a kill is the kernel's SIGKILL, not an exception. `make test` runs a seeded sample;
`make faults` (PREFALIGN_FAULTS_FULL=1) all of it. The uninterrupted runs (one per trainer x variant)
are shared by the cases through a module fixture.
"""

from __future__ import annotations

import difflib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faultkit import FULL, sample, tally
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import held_out_pairs, learnable_pairs, write_jsonl

KIND = "kill (SIGKILL)"
HERE = Path(__file__).parent
REWARD = HERE.parent / "fixtures" / "rewards.py"

# metrics.jsonl keys that measure the machine, not the training (docs/metrics.md): wall times and what is
# derived from them, and the process's memory high-water mark, which a resumed process starts afresh.
# Every other key (losses, rewards, log-probs, KL, gradient norms, learning rate, eval/*, counts) is compared.
MACHINE_KEYS = frozenset({"step_seconds", "tokens_per_s", "peak_memory_bytes", "ppo/rollout_seconds",
                          "ppo/update_seconds", "ppo/generation_tokens_per_s", "ppo/rollout_share",
                          "ppo/generation_share"})
TOL = 1e-6

OFFLINE = ["max_steps=6", "batch_size=4", "save_every=2", "keep_checkpoints=3", "eval_every=3", "learning_rate=1e-3",
           "max_length=48"]
MONITOR = ["kl_every=3", "kl_prompts=4", "kl_max_new_tokens=6"]  # the KL monitor samples: its RNG must not leak
RL = ["max_steps=4", "batch_size=4", "save_every=2", "keep_checkpoints=3", "learning_rate=1e-3", "max_new_tokens=8",
      "ppo_epochs=2", "num_minibatches=2", "kl_every=2", "kl_prompts=4", "kl_max_new_tokens=6",
      "reward_norm=running", "kl_target=1.0", f"--reward={REWARD}:great"]
TRAINERS = {  # trainer -> (its data files' flags, its settings)
    "dpo": (["--data={pairs}", "eval_data={eval}"], OFFLINE + MONITOR + ["reference=precompute"]),
    # two micro-batches a step: a kill between their backwards
    "sft": (["--data={sft}", "eval_data={sft_eval}"], OFFLINE + MONITOR + ["batch_size=2", "grad_accum=2"]),
    "reward": (["--data={pairs}", "eval_data={eval}"], OFFLINE),
    "ppo": (["--prompts={prompts}"], RL),
    "rloo": (["--prompts={prompts}"], RL + ["samples_per_prompt=2"]),
}
COMMON = ["step", "optimizer.step", "metrics.write", "checkpoint.write", "checkpoint.commit", "final.write", "outside",
          "twice", "metrics.rewrite"]  # twice: killed at one of the others, then the resume killed too;
# metrics.rewrite: killed at a step after the first checkpoint, then the resume killed as it cuts metrics.jsonl
MOMENTS = {"dpo": COMMON + ["backward", "eval", "reference.precompute", "reference.cache.write"],
           "sft": COMMON + ["backward", "eval"], "reward": COMMON + ["backward", "eval"],
           "ppo": COMMON + ["rollout"], "rloo": COMMON + ["rollout"]}
CASES = [(t, v, m) for t in TRAINERS for v in ("full", "lora") for m in MOMENTS[t]]
SAVES = ("checkpoint.write", "checkpoint.commit")


def _picked() -> list[tuple[str, str, str]]:
    """`make test`: one seeded case per trainer; one of them a kill inside a checkpoint save, one a kill
    from outside, the others at any other fail point."""
    trainers = list(TRAINERS)
    random.Random(16).shuffle(trainers)
    kinds = [lambda m: m in SAVES, lambda m: m == "outside"] + [lambda m: m not in SAVES and m != "outside"] * 3
    return [sample([c for c in CASES if c[0] == t and kind(c[2])], 1, seed=16)[0]
            for t, kind in zip(trainers, kinds, strict=False)]


# ------------------------------------------------------------------ runs: forked from one server


class Server:
    """forkserver.py in a subprocess: `run` starts a training command in a forked child."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        env.pop("PREFALIGN_FAULTS", None)
        self.proc = subprocess.Popen([sys.executable, str(HERE / "forkserver.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def start(self, argv: list[str], log: Path, faults: str = "", hits: Path | None = None) -> int:
        job = {"argv": argv, "env": {"PREFALIGN_FAULTS": faults}, "log": str(log), "hits": hits and str(hits)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._answer()["pid"]

    def wait(self, pid: int) -> int:
        """The child's exit status once it ended; only now may the server reap it (and its PID be reused)."""
        self.proc.stdin.write(json.dumps({"reap": pid}) + "\n")
        self.proc.stdin.flush()
        return self._answer()["rc"]

    def run(self, argv: list[str], log: Path, faults: str = "", hits: Path | None = None) -> int:
        return self.wait(self.start(argv, log, faults, hits))

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the fork server died (exit status {self.proc.poll()})"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()  # the server exits at the end of its input
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-data")
    pairs = learnable_pairs(16)
    held = held_out_pairs(pairs, 8)
    sft = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs + held]
    return {"pairs": write_jsonl(root / "pairs.jsonl", pairs), "eval": write_jsonl(root / "eval.jsonl", held),
            "sft": write_jsonl(root / "sft.jsonl", sft[:16]),
            "sft_eval": write_jsonl(root / "sft_eval.jsonl", sft[16:]),
            "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": p["prompt"]} for p in pairs])}


def command(trainer: str, variant: str, model: Path, files: dict, out: Path, *extra: str) -> list[str]:
    data, settings = TRAINERS[trainer]
    return ["train", "--method", trainer, "--model", str(model), *(d.format(**files) for d in data), "-o", str(out),
            "--no-progress", *settings, f"lora={variant == 'lora'}", *extra]


@pytest.fixture(scope="module")
def baselines(server, files, tiny_models, tmp_path_factory):
    """(trainer, variant) -> (the uninterrupted run's folder, how often it reached each fail point)."""
    root, done = tmp_path_factory.mktemp("kill-baselines"), {}

    def get(trainer: str, variant: str) -> tuple[Path, dict[str, int]]:
        if (trainer, variant) not in done:
            out = root / f"{trainer}-{variant}" / "run"  # named as the killed run's: the model card's title
            out.parent.mkdir()
            # a rule that never fires makes the run count its hits of every point (prefalign/faults.py)
            rc = server.run(command(trainer, variant, tiny_models["llama"], files, out), out.parent / "run.log",
                            "kill@never#1", out.parent / "hits.json")
            assert rc == 0, (out.parent / "run.log").read_text()[-3000:]
            done[trainer, variant] = out, json.loads((out.parent / "hits.json").read_text())
        return done[trainer, variant]

    return get


# ------------------------------------------------------------------ what must be equal


def metric_problems(base: Path, run: Path) -> list[str]:
    rows_a = [json.loads(x) for x in (base / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps_a, steps_b = [r["step"] for r in rows_a], [r["step"] for r in rows_b]
    if steps_b != steps_a:
        return [f"metrics.jsonl steps {steps_b} != the uninterrupted run's {steps_a}"]
    return [p for a, b in zip(rows_a, rows_b, strict=True) for p in row_problems(a, b, f"step {a['step']}")]


def row_problems(a: dict, b: dict, what: str) -> list[str]:
    """`b` has `a`'s keys and, but for MACHINE_KEYS, its values (numbers to TOL)."""
    out = [f"{what}: keys differ: {sorted(set(a) ^ set(b))}"] if set(a) != set(b) else []
    for k in sorted((set(a) & set(b)) - MACHINE_KEYS):
        x, y = a[k], b[k]
        numbers = isinstance(x, float | int) and isinstance(y, float | int)
        same = (abs(x - y) <= TOL or (x != x and y != y)) if numbers else x == y
        if not same:
            out.append(f"{what}: {k} {y} != {x}")
    return out


def summary_problems(base: Path, run: Path) -> list[str]:
    """run.json counts the run, not its last attempt: its steps, tokens, skipped steps and last row are
    the uninterrupted run's."""
    try:
        a, b = json.loads((base / "run.json").read_text()), json.loads((run / "run.json").read_text())
    except (OSError, ValueError) as e:
        return [f"run.json: {e}"]
    keys = ("steps", "tokens", "skipped_steps")
    out = [f"run.json {k} {b.get(k)} != {a.get(k)}" for k in keys if b.get(k) != a.get(k)]
    return out + row_problems(a.get("final") or {}, b.get("final") or {}, "run.json final")


def tracker_problems(run: Path) -> list[str]:
    """TensorBoard (the default tracker) over both attempts' event files shows the run once: every
    series is metrics.jsonl's, each step once, none the killed attempt sent and the resume sent again."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    want = {k: [(r["step"], r[k]) for r in rows if k in r] for r in rows for k in r if k != "step"}
    out = [f"TensorBoard lacks {k}" for k in sorted(set(want) - set(got) - MACHINE_KEYS)]
    for tag in sorted(set(got) - MACHINE_KEYS):
        steps, values = [s for s, _ in got[tag]], [v for _, v in got[tag]]
        if steps != [s for s, _ in want.get(tag, [])]:
            out.append(f"TensorBoard's {tag} has steps {steps}, metrics.jsonl {[s for s, _ in want.get(tag, [])]}")
        elif values != pytest.approx([v for _, v in want[tag]], rel=1e-6, abs=1e-7, nan_ok=True):  # stored as float32
            out.append(f"TensorBoard's {tag} differs from metrics.jsonl")
    return out


def card(text: str, out: Path) -> str:
    """final/README.md as a rerun must reproduce it: the run's folder, the resume flag, and the machine's
    measurements (MACHINE_KEYS, wall time, memory, token rate) taken out."""
    keep = []
    for line in text.replace(str(out), "RUN").replace(" resume=true", "").replace("resume: true", "resume: false") \
            .splitlines():
        if any(f"`{k}`" in line for k in MACHINE_KEYS) or line.startswith(("| wall time", "| peak memory")):
            continue
        keep.append(re.sub(r" \([0-9.e+-]+ tokens/s\)", "", line))
    return "\n".join(keep)


def folder_problems(a: Path, b: Path, what: str, times: bool = False) -> list[str]:
    """`b` holds what `a` holds: the same files, safetensors' tensors equal exactly (and their metadata),
    JSON equal as values, the model card equal but for the machine, every other file byte for byte.
    `times`: a checkpoint, whose JSON records the loop's wall time so far (and whatever hashes that): its
    JSON need only be whole here; what it says is checked by the resume, which must reproduce the run."""
    names_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    names_b = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    if names_a != names_b:
        return [f"{what}: files {names_b} != {names_a}"]
    out = []
    for name in names_a:
        fa, fb = a / name, b / name
        if name.endswith(".safetensors"):
            try:  # a damaged file does not even open: a problem, never an error before the tally
                ta, tb = load_file(str(fa)), load_file(str(fb))
                with safe_open(str(fa), "pt") as ha, safe_open(str(fb), "pt") as hb:
                    meta_same = ha.metadata() == hb.metadata()
            except Exception as e:
                out.append(f"{what}/{name} does not load: {e}")
                continue
            if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta) or not meta_same:
                out.append(f"{what}/{name}: tensors differ")
        elif name.endswith(".json"):
            try:
                same = json.loads(fb.read_text()) == json.loads(fa.read_text()) or times
            except ValueError:
                same = False
            if not same:
                out.append(f"{what}/{name} differs")
        elif name == "README.md":
            lines_a, lines_b = card(fa.read_text(), a.parent).splitlines(), card(fb.read_text(), b.parent).splitlines()
            if lines_a != lines_b:
                diff = [x for x in difflib.unified_diff(lines_a, lines_b, lineterm="", n=0) if x[:1] in "+-"][2:6]
                out.append(f"{what}/README.md (the model card) differs beyond the machine's measurements: {diff}")
        elif fa.read_bytes() != fb.read_bytes():
            out.append(f"{what}/{name} differs")
    return out


def committed(run: Path) -> list[int]:
    ckpts = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in ckpts.iterdir() if p.name[5:].isdigit()) if ckpts.exists() else []


# ------------------------------------------------------------------ the kill


def kill_outside(server: Server, argv: list[str], out: Path, log: Path, rng: random.Random) -> tuple[int, str]:
    """SIGKILL from outside at a seeded delay after the first checkpoint is committed; a run that ended
    first is started again (a fresh folder) with half the delay."""
    delay = rng.uniform(0.0, 0.4)
    for _ in range(6):
        shutil.rmtree(out, ignore_errors=True)
        pid, deadline = server.start(argv, log), time.monotonic() + 120
        while not committed(out) and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)  # still ours: a child that ended first is not reaped before wait()
        rc = server.wait(pid)
        if rc == -signal.SIGKILL:
            return rc, f"{delay * 1000:.0f} ms after checkpoint step-{committed(out)[0]}"
        delay /= 2
    return rc, "the run always ended before the kill"


def cache_problems(base: Path, run: Path) -> list[str]:
    """A reference cache after a kill: absent, or the uninterrupted run's whole table."""
    out = []
    for name in ("ref_logps.safetensors", "ref_logps_eval.safetensors"):
        if (run / name).exists():
            try:
                same = torch.equal(load_file(str(run / name))["logps"], load_file(str(base / name))["logps"])
            except Exception as e:  # a half-written file does not even open
                same, name = False, f"{name} ({e})"
            if not same:
                out.append(f"the reference cache {name} is there but not whole")
    return out


def kill_at(server: Server, argv: list[str], log: Path, point: str, hit: int, of: int) -> tuple[int, str]:
    return server.run(argv, log, f"kill@{point}#{hit}"), f"{point}#{hit} of {of}"


def aftermath(base: Path, out: Path, point: str, hit: int) -> list[str]:
    """What a kill at `point`'s `hit` must leave: a save killed half-way uncommitted and the checkpoint
    before it whole (save_every=2: save n is step 2n); a reference cache absent or whole."""
    problems, left = [], committed(out)
    if point in SAVES:
        save, prev = 2 * hit, 2 * hit - 2
        if save in left or not (out / "checkpoints" / f"step-{save}.tmp").is_dir():
            problems.append(f"the save of step {save} killed half-way: committed {left}")
        if left and left[-1] == prev:
            problems += folder_problems(base / "checkpoints" / f"step-{prev}", out / "checkpoints" / f"step-{prev}",
                                        f"checkpoints/step-{prev}", times=True)
        elif prev:
            problems.append(f"checkpoint step-{prev} is not the newest one left: committed {left}")
    if point.startswith("reference"):
        problems += cache_problems(base, out)
    return problems


def resume_problems(server: Server, argv: list[str], base: Path, out: Path, log: Path) -> list[str]:
    """The resume: it must take the newest committed checkpoint and complete the uninterrupted run."""
    left = committed(out)
    rc = server.run(argv + ["resume=true"], log)
    text = log.read_text()
    if rc != 0:
        return [f"the resumed run failed (exit status {rc}): {text[-2000:]}"]
    problems = []
    said = re.findall(r"resumed from checkpoints/step-(\d+)", text)
    if said != [str(s) for s in left[-1:]]:
        problems.append(f"resumed from {said}, the newest committed checkpoint was {left[-1:] or 'none'}")
    if any(p.name.endswith(".tmp") for p in (out / "checkpoints").iterdir()):
        problems.append("a half-written save is still there after the resume")
    return problems + metric_problems(base, out) + summary_problems(base, out) \
        + folder_problems(base / "final", out / "final", "final") + tracker_problems(out)


@pytest.mark.parametrize(("trainer", "variant", "moment"), CASES if FULL else _picked(),
                         ids=lambda x: str(x))
def test_a_killed_run_resumes_to_the_uninterrupted_run(trainer, variant, moment, server, baselines, files,
                                                       tiny_models, tmp_path):
    base, hits = baselines(trainer, variant)
    out, rng = tmp_path / "run", random.Random(f"{trainer}/{variant}/{moment}")
    argv, killed = command(trainer, variant, tiny_models["llama"], files, out), tmp_path / "killed.log"
    point = rng.choice([m for m in MOMENTS[trainer] if m not in ("outside", "twice", "metrics.rewrite")]) \
        if moment == "twice" else "step" if moment == "metrics.rewrite" else moment
    if point == "outside":
        rc, where = kill_outside(server, argv, out, killed, rng)
    else:
        assert hits.get(point, 0) >= 1, f"an uninterrupted {trainer} run never reaches {point}: {hits}"
        # a save's kill: one after the first, so that there is a checkpoint before it to keep and take
        # metrics.rewrite: after the first checkpoint (step 2), so that the resume has a metrics.jsonl to cut
        hit = rng.randint(3 if moment == "metrics.rewrite" else 2 if point in SAVES else 1, hits[point])
        rc, where = kill_at(server, argv, killed, point, hit, hits[point])
    # every check is a problem, none an assertion, until the kill is tallied
    problems = [] if rc == -signal.SIGKILL else [
        f"{where}: exit status {rc}, not SIGKILL\n" + killed.read_text()[-2000:]]
    problems += aftermath(base, out, point, hit) if point != "outside" else []
    kills = 1
    if moment in ("twice", "metrics.rewrite"):  # the resume is killed too, then resumed
        left = (committed(out) or [0])[-1]
        steps = int(next(a for a in argv if a.startswith("max_steps=")).split("=")[1]) - left
        # at a step it has left (or in final/); or as it cuts metrics.jsonl back to its checkpoint
        second = ("metrics.rewrite", 1, 1) if moment == "metrics.rewrite" else \
            ("step", rng.randint(1, steps), steps) if steps else ("final.write", 1, 1)
        rc, again = kill_at(server, argv + ["resume=true"], tmp_path / "killed-again.log", *second)
        problems += [] if rc == -signal.SIGKILL else [f"{again}: exit status {rc}, not SIGKILL"]
        where, kills = f"{where}, then the resume at {again}", 2
    try:
        problems += resume_problems(server, argv, base, out, tmp_path / "resumed.log")
    except Exception as e:  # whatever the check trips on (a file not there, not JSON) is a loss, tallied first
        problems.append(f"checking the resume failed: {type(e).__name__}: {e}")
    tally(KIND, survived=not problems, lost=int(bool(problems)), detail=f"{trainer} {variant} {where}", count=kills)
    assert not problems, f"{trainer} {variant}, killed at {where}:\n" + "\n".join(problems[:20])
