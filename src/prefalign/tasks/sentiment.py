"""Controlled sentiment generation (Rafailov et al. 2023, §6.1) on the model prefalign ships.

Prompts are prefixes of held-out IMDb reviews; the policy should continue them positively; the
ground truth is VADER (prefalign.judges.sentiment). Preference pairs are made as in the paper: sample
several continuations per prefix from the base model and let the scorer pick the best and the
worst. The demo and the study are both built from the steps here, with different sizes.

Three disjoint prompt sets (scripts/build_prefixes.py): train prompts (pairs, PPO rollouts),
validation prompts (where settings are chosen) and test prompts (the figures that are reported).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data.curate import CurateConfig, curate
from ..errors import DataError
from ..eval.evaluate import EvalConfig
from ..eval.evaluate import evaluate as run_eval
from ..feedback.label import LabelConfig, label
from ..feedback.sample import SampleConfig, sample
from ..report.card import write_card
from ..train.methods import get_method, train_config
from ..train.run import train as run_train

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BASE_MODEL = ASSETS / "imdb-lm"
PREFIXES = ASSETS / "imdb_prefixes.jsonl"  # test prefixes first, then the train prompts
VALIDATION_PREFIXES = ASSETS / "imdb_prefixes_validation.jsonl"
REWARD = "prefalign.judges.sentiment:positive"
Split = Literal["validation", "test"]


@dataclass
class Sizes:
    train_prompts: int = 128
    eval_prompts: int = 64
    samples: int = 4  # continuations per prefix for the pairs
    max_new_tokens: int = 32
    seed: int = 0
    lora: dict[str, Any] = field(default_factory=lambda: {"r": 16, "lora_alpha": 32})


def normalise(text: str) -> str:
    """What counts as the same text: case, punctuation and spacing ignored."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]|_", " ", text).split())


def check_disjoint(sets: dict[str, list[str]]) -> None:
    """Raise ValueError when a text (after `normalise`) is in two sets or twice in one."""
    seen: dict[str, str] = {}
    for name, texts in sets.items():
        for text in texts:
            key = normalise(text)
            if key in seen:
                raise DataError(f"prompt {text!r} is in {seen[key]} and {name}: the sets must be disjoint")
            seen[key] = name


def _prompts(path: Path) -> list[str]:
    return [json.loads(x)["prompt"] for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def split_prefixes(out: Path, sizes: Sizes, split: Split = "test", prefixes: Path = PREFIXES,
                   validation: Path = VALIDATION_PREFIXES) -> tuple[Path, Path]:
    """Write (train prompts, held-out prompts) to OUT; the held-out ones are SPLIT's.

    The first `eval_prompts` rows of PREFIXES are the test prompts and the next `train_prompts` the
    train prompts, so a run on the validation split trains on exactly the prompts a run on the test
    split does; the validation prompts are the first `eval_prompts` of VALIDATION_PREFIXES.
    """
    rows, val = _prompts(prefixes), _prompts(validation)
    need = sizes.eval_prompts + sizes.train_prompts
    if len(rows) < need or len(val) < sizes.eval_prompts:
        raise DataError(f"{prefixes} has {len(rows)} prefixes ({need} needed), {validation} {len(val)} "
                         f"({sizes.eval_prompts} needed)")
    sets = {"test": rows[:sizes.eval_prompts], "train": rows[sizes.eval_prompts:need], "validation": val}
    check_disjoint(sets)  # the whole validation file: no test or train prompt may hide in its tail either
    out.mkdir(parents=True, exist_ok=True)
    held_out, train = out / "eval_prompts.jsonl", out / "train_prompts.jsonl"
    for path, texts in ((held_out, sets[split][:sizes.eval_prompts]), (train, sets["train"])):
        path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts), encoding="utf-8")
    return train, held_out


def make_pairs(out: Path, base: Path, train_prompts: Path, sizes: Sizes, log: Callable[[str], None],
               judge: str = REWARD, device: str = "cpu") -> tuple[Path, dict]:
    """Sample `samples` continuations per prefix from the base, label best-vs-worst by JUDGE, curate."""

    s = sample(SampleConfig(model=str(base), prompts=str(train_prompts), output=str(out / "samples.jsonl"),
                            n=sizes.samples, max_new_tokens=sizes.max_new_tokens, seed=sizes.seed, device=device), log)
    lab = label(LabelConfig(samples=str(out / "samples.jsonl"), judge=judge, output=str(out / "pairs_raw.jsonl")), log)
    cur = curate(out / "pairs_raw.jsonl", out / "pairs.jsonl", out / "pairs.quarantine.jsonl", CurateConfig())
    log(f"pairs: {cur.kept} kept after curation, set aside {dict(cur.set_aside)}; "
        f"mean score gap chosen - rejected {lab['mean_score_gap']:.3f}")
    return out / "pairs.jsonl", {"sample": s, "label": lab, "curate": cur.to_json()}


def train_settings(run: Path, base: Path, method: str, data: Path | None, prompts: Path | None, sizes: Sizes,
                   **settings: Any):
    """The validated config of one LoRA run of any method on the task (`settings` win)."""
    # the KL monitor samples completions as long as the evaluation's, so its KL and eval's compare
    common = {"model": str(base), "output": str(run), "method": method, "lora": sizes.lora, "seed": sizes.seed,
              "device": "cpu", "lr_schedule": "constant", "kl_max_new_tokens": sizes.max_new_tokens, **settings}
    if get_method(method).trainer == "rl":
        common = {"prompts": str(prompts), "reward": REWARD, "max_new_tokens": sizes.max_new_tokens, **common}
    else:
        common = {"data": str(data), **common}
    return train_config(common, f"{method} run")


def train(run: Path, base: Path, method: str, data: Path | None, prompts: Path | None, sizes: Sizes,
          log: Callable[[str], None], progress: bool = True, **settings: Any) -> dict:
    """One LoRA run of any method on the task; returns its run.json."""
    run_train(train_settings(run, base, method, data, prompts, sizes, **settings), log=log, progress=progress)
    return json.loads((run / "run.json").read_text())


def evaluate(model: Path, out: Path, base: Path, held_out: Path, sizes: Sizes, log: Callable[[str], None],
             progress: bool = True, judge: str = REWARD) -> dict:
    """Held-out reward (JUDGE), win-rate against the base and exact KL to the base, written to OUT."""

    cfg = EvalConfig(model=str(model), reference=str(base), prompts=str(held_out), judge=judge, output=str(out),
                     max_new_tokens=sizes.max_new_tokens, seed=sizes.seed + 1, device="cpu")
    return run_eval(cfg, log=log, progress=progress)


def evaluate_all(models: list[tuple[Path, Path]], base: Path, held_out: Path, sizes: Sizes,
                 log: Callable[[str], None], progress: bool = True, judge: str = REWARD) -> list[dict]:
    """`evaluate` for each (model, out) in turn: one process for the whole eval stage. A trained model
    (a run's final/) then gets its model card, with this evaluation in it."""
    results = []
    for model, out in models:
        results.append(evaluate(model, out, base, held_out, sizes, log, progress, judge))
        if model.name == "final" and (model.parent / "run.json").exists():
            log(f"model card -> {write_card(model.parent, eval_dir=out, fresh_stats=True)}")
    return results
