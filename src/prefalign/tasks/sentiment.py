"""Controlled sentiment generation (Rafailov et al. 2023, §6.1) on the model prefalign ships.

Prompts are prefixes of held-out IMDb reviews; the policy should continue them positively; the
ground truth is VADER (prefalign.eval.sentiment). Preference pairs are made as in the paper: sample
several continuations per prefix from the base model and let the scorer pick the best and the
worst. The demo and the study are both built from the steps here, with different sizes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BASE_MODEL = ASSETS / "imdb-lm"
PREFIXES = ASSETS / "imdb_prefixes.jsonl"
REWARD = "prefalign.eval.sentiment:positive"


@dataclass
class Sizes:
    train_prompts: int = 128
    eval_prompts: int = 64
    samples: int = 4  # continuations per prefix for the pairs
    max_new_tokens: int = 32
    seed: int = 0
    lora: dict[str, Any] = field(default_factory=lambda: {"r": 16, "lora_alpha": 32})


def split_prefixes(out: Path, sizes: Sizes, prefixes: Path = PREFIXES) -> tuple[Path, Path]:
    """The first `eval_prompts` prefixes are held out for evaluation; the next `train_prompts` train."""
    rows = [x for x in prefixes.read_text(encoding="utf-8").splitlines() if x.strip()]
    need = sizes.eval_prompts + sizes.train_prompts
    if len(rows) < need:
        raise ValueError(f"{prefixes}: {len(rows)} prefixes, {need} needed")
    out.mkdir(parents=True, exist_ok=True)
    held_out, train = out / "eval_prompts.jsonl", out / "train_prompts.jsonl"
    held_out.write_text("\n".join(rows[:sizes.eval_prompts]) + "\n")
    train.write_text("\n".join(rows[sizes.eval_prompts:need]) + "\n")
    return train, held_out


def make_pairs(out: Path, base: Path, train_prompts: Path, sizes: Sizes, log: Callable[[str], None]) -> tuple[Path, dict]:
    """Sample `samples` continuations per prefix from the base, label best-vs-worst by VADER, curate."""
    from ..data.curate import CurateConfig, curate
    from ..feedback.label import LabelConfig, label
    from ..feedback.sample import SampleConfig, sample

    s = sample(SampleConfig(model=str(base), prompts=str(train_prompts), output=str(out / "samples.jsonl"),
                            n=sizes.samples, max_new_tokens=sizes.max_new_tokens, seed=sizes.seed, device="cpu"), log)
    lab = label(LabelConfig(samples=str(out / "samples.jsonl"), judge=REWARD, output=str(out / "pairs_raw.jsonl")), log)
    cur = curate(out / "pairs_raw.jsonl", out / "pairs.jsonl", out / "pairs.quarantine.jsonl", CurateConfig())
    log(f"pairs: {cur.kept} kept after curation, set aside {dict(cur.set_aside)}; "
        f"mean VADER gap chosen - rejected {lab['mean_score_gap']:.3f}")
    return out / "pairs.jsonl", {"sample": s, "label": lab, "curate": cur.to_json()}


def train(run: Path, base: Path, method: str, data: Path | None, prompts: Path | None, sizes: Sizes,
          log: Callable[[str], None], progress: bool = True, **settings: Any) -> dict:
    """One LoRA run of any method on the task; returns its run.json."""
    from ..config import load_config
    from ..train.config import RL_METHODS, RLConfig, TrainConfig
    from ..train.offline import run_offline
    from ..train.ppo import run_rl

    common = {"model": str(base), "output": str(run), "method": method, "lora": sizes.lora, "seed": sizes.seed,
              "device": "cpu", "lr_schedule": "constant", **settings}
    if method in RL_METHODS:
        cfg = load_config(RLConfig, base={"prompts": str(prompts), "reward": REWARD,
                                          "max_new_tokens": sizes.max_new_tokens, **common})
        run_rl(cfg, log=log, progress=progress)
    else:
        cfg = load_config(TrainConfig, base={"data": str(data), **common})
        run_offline(cfg, log=log, progress=progress)
    return json.loads((run / "run.json").read_text())


def evaluate(model: Path, out: Path, base: Path, held_out: Path, sizes: Sizes, log: Callable[[str], None],
             progress: bool = True) -> dict:
    """Held-out VADER reward, win-rate against the base and exact KL to the base, written to OUT."""
    from ..eval.evaluate import EvalConfig
    from ..eval.evaluate import evaluate as run_eval

    cfg = EvalConfig(model=str(model), reference=str(base), prompts=str(held_out), judge=REWARD, output=str(out),
                     max_new_tokens=sizes.max_new_tokens, seed=sizes.seed + 1, device="cpu")
    return run_eval(cfg, log=log, progress=progress)
