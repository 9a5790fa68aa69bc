"""`prefalign iterate`: online (iterative) DPO. Each round samples n completions per prompt from the
current model, labels best-vs-worst pairs with the judge, and trains DPO on them starting from, and
anchored to, the current model (Xu et al. 2023; Yuan et al. 2024); the result is the next round's
model. `iterate.json` records, per round, the judge's mean score of what the model sampled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import dump_config
from ..errors import DataError
from ..judges import make_judge
from ..runtime.device import pick_device
from ..train.methods import METHODS, train_config
from ..train.run import train
from .label import LabelConfig, label
from .sample import SampleConfig, SamplingRun, sample


class IterateConfig(SamplingRun):
    """`prefalign iterate`: rounds of sample -> label -> train, each round from the last round's model."""

    model: str = Field(..., description="the starting model")
    judge: str = Field(..., description="MODULE:FUNCTION, FILE.py:FUNCTION, a reward-model or a causal-LM folder")
    output: str = Field(..., description="folder of round-N/ and iterate.json")
    iterations: int = Field(2, ge=1, description="rounds")
    n: int = Field(4, ge=2, description="completions sampled per prompt and round (2 or more: they are compared)")
    mode: Literal["best_vs_worst", "best_vs_rest", "all"] = Field("best_vs_worst", description="pairs made per prompt")
    train: dict[str, Any] = Field({}, description="`prefalign train` keys for every round (method defaults to dpo)")

    @model_validator(mode="after")
    def _check_train(self):
        # validated now, with this round's model/data/output standing in, not after a sampling round
        if owned := sorted(set(self.train) & {"model", "data", "output"}):
            raise ValueError(f"train: {', '.join(owned)} are set by each round (the last round's model, its pairs, "
                             "round-N/train)")
        stand_in = train_config({"method": "dpo", **self._template(), **self.train,
                                 **self._round(self.model, Path(self.output))}, "train")
        spec = METHODS[stand_in.method]
        # the pairs it labels, or their chosen answers (best-of-n SFT); the result must be a policy
        if spec.trainer != "offline" or spec.inputs != "logps" or spec.unit not in ("pairs", "completions"):
            raise ValueError(f"iterate trains a policy on the pairs it labels: {stand_in.method} cannot")
        return self

    def _template(self) -> dict[str, str]:
        """The chat template sampling uses, for training too (a round's final/ then carries it)."""
        return {"chat_template": self.chat_template} if self.chat_template else {}

    def _round(self, model: str, folder: Path) -> dict[str, str]:
        return {"model": model, "data": str(folder / "pairs.jsonl"), "output": str(folder / "train")}


def iterate(cfg: IterateConfig, log=print, progress: bool = True, after_round=None) -> dict:
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    judge = make_judge(cfg.judge, pick_device(cfg.device), pairwise_ok=True)  # loaded once for all rounds
    model, rounds = cfg.model, []
    for r in range(1, cfg.iterations + 1):
        folder = out / f"round-{r}"
        log(f"round {r}/{cfg.iterations}: sample from {model}")
        shared = {k: getattr(cfg, k) for k in SamplingRun.model_fields}
        s = sample(SampleConfig(**{**shared, "seed": cfg.seed + r}, model=model, output=str(folder / "samples.jsonl")),
                   log)
        lab = label(
            LabelConfig(
                samples=str(folder / "samples.jsonl"),
                judge=cfg.judge,
                output=str(folder / "pairs.jsonl"),
                mode=cfg.mode,
            ),
            log,
            judge=judge,
        )
        if not lab["written"]:
            raise DataError(f"round {r}: the judge found no preference among the samples (all ties)")
        train_cfg = train_config({"method": "dpo", **cfg._template(), **cfg.train, **cfg._round(model, folder)},
                                 "iterate: train")
        result = train(train_cfg, log=log, progress=progress)
        if after_round is not None:  # the CLI: the round's model card (and push), as soon as it exists
            after_round(train_cfg.output)
        rounds.append({"round": r, "model": model, "sample": s, "label": lab,
                       "train": {"steps": result.steps, "wall_seconds": result.wall_seconds, "final": result.last}})
        model = str(folder / "train" / "final")
    summary = {"rounds": rounds, "final_model": model}
    (out / "iterate.json").write_text(json.dumps(summary, indent=2))
    log(f"judge mean score of samples by round: {[round(x['label']['mean_score'] or 0, 4) for x in rounds]}; "
        f"final model {model}")
    return summary
