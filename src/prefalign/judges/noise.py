"""The label-noise sources that need a model: a pairwise judge asked in both orders (its order
inconsistency: a diagnostic, not an estimate), a reference reward model's agreement with the labels
(data/noise.py has the estimators; `prefalign data stats --judge/--reward-model`)."""

from __future__ import annotations

from pathlib import Path

from ..data import ReadOptions, load_records
from ..data.noise import Estimate, from_reward_model, order_inconsistency
from ..data.records import PreferencePair, text_of
from ..errors import ConfigError
from . import make_judge

BATCH = 64


def judge_order_estimate(judge, pairs: list[PreferencePair]) -> Estimate | None:
    """A pairwise judge (`judge.compare`) on every pair in both orders: its order inconsistency (a diagnostic)."""
    agreements: list[bool] = []
    for i in range(0, len(pairs), BATCH):
        part = pairs[i:i + BATCH]
        _, agree = judge.compare([p.prompt for p in part], [text_of(p.chosen) for p in part],
                                 [text_of(p.rejected) for p in part])
        agreements += [bool(a) for a in agree.tolist()]
    return order_inconsistency(agreements.count(False), len(agreements)) if agreements else None


def reward_model_estimate(scorer, pairs: list[PreferencePair], accuracy: float | None = None,
                          accuracy_pairs: int | None = None) -> Estimate | None:
    """A scalar judge (`scorer.score`: a reward model or a callable) on both answers of every pair; it
    disagrees with a label when it scores the rejected answer higher. Equal scores say nothing and are left
    out of the count."""
    disagree = compared = 0
    for i in range(0, len(pairs), BATCH):
        part = pairs[i:i + BATCH]
        prompts = [p.prompt for p in part]
        chosen = scorer.score(prompts, [text_of(p.chosen) for p in part])
        rejected = scorer.score(prompts, [text_of(p.rejected) for p in part])
        for c, r in zip(chosen, rejected, strict=True):
            if c != r:
                compared += 1
                disagree += r > c
    if not compared:
        return None
    return from_reward_model(disagree, compared, accuracy, accuracy_pairs)


def model_estimates(path: str | Path, opts: ReadOptions, judge: str | None = None, reward_model: str | None = None,
                    accuracy: float | None = None, accuracy_pairs: int | None = None,
                    device: str = "cpu") -> list[Estimate]:
    """The estimates the models asked for give on the pairs of `path` (each model loaded once)."""
    if accuracy is not None and reward_model is None:
        raise ConfigError("--reward-model-accuracy needs --reward-model")
    if accuracy is not None and not 0.5 < accuracy <= 1:
        raise ConfigError(f"--reward-model-accuracy {accuracy:g}: must be in (0.5, 1] (a model at or below chance "
                          "tells nothing about the labels; a share, not a percentage)")
    if accuracy_pairs is not None and accuracy is None:
        raise ConfigError("--reward-model-accuracy-pairs needs --reward-model-accuracy (the accuracy it was "
                          "measured with)")
    if accuracy_pairs is not None and accuracy_pairs < 1:
        raise ConfigError(f"--reward-model-accuracy-pairs {accuracy_pairs}: must be a positive number of pairs")
    if not judge and not reward_model:
        return []
    pairs = [r for r in load_records(path, opts)[0] if isinstance(r, PreferencePair)]
    out = []
    if judge:
        pairwise = make_judge(judge, device, pairwise_ok=True)
        if pairwise.kind != "pairwise":
            raise ConfigError(f"--judge {judge}: a pairwise judge is a causal LM; a {pairwise.kind} goes in "
                              "--reward-model")
        out.append(judge_order_estimate(pairwise, pairs))
    if reward_model:
        scorer = make_judge(reward_model, device)
        out.append(reward_model_estimate(scorer, pairs, accuracy, accuracy_pairs))
    return [e for e in out if e is not None]
