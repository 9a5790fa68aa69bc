"""What the checkpoint and disk-full fault tests share: one uninterrupted tiny DPO run per checkpoint format
(checkpoints at steps 2, 4 and 6, the reference precomputed), trained once per test process."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import learnable_pairs, write_jsonl
from prefalign.train.methods import make_config
from prefalign.train.run import train

_RUNS: dict[str, tuple[Path, object]] = {}


def config(model: Path, root: Path, fmt: str = "whole", **over):
    data = write_jsonl(root / "pairs.jsonl", learnable_pairs(16))
    sharded = {"distributed": "fsdp", "checkpoint_format": "sharded"} if fmt == "sharded" else {}
    return make_config(model=str(model), data=str(data), max_steps=6, batch_size=4, learning_rate=1e-3,
                       save_every=2, keep_checkpoints=3, reference="precompute", **sharded, **over)


def straight(tiny_models, tmp_path_factory, fmt: str = "whole"):
    """(the uninterrupted run's folder, its config); the run is not to be written to."""
    if fmt not in _RUNS:
        root = tmp_path_factory.mktemp(f"straight-{fmt}")
        cfg = config(tiny_models["llama"], root, fmt, output=str(root / "run"))
        train(cfg, log=lambda _: None, progress=False)
        _RUNS[fmt] = (root / "run", cfg)
    return _RUNS[fmt]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def steps_lost(run: Path, reference: Path) -> int:
    """Steps whose loss is missing from `run` or differs from the uninterrupted run's by more than 1e-6."""
    got, want = losses(run), losses(reference)
    return sum(abs(got.get(s, float("inf")) - want[s]) > 1e-6 for s in want)


def resume(cfg, out: Path) -> list[str]:
    logs: list[str] = []
    train(cfg.model_copy(update={"output": str(out), "resume": True}), log=logs.append, progress=False)
    return logs
