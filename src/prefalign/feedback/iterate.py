"""`prefalign iterate`: online (iterative) DPO. Each round samples n completions per prompt from the
current model, labels best-vs-worst pairs with the judge, and trains DPO on them starting from, and
anchored to, the current model (Xu et al. 2023; Yuan et al. 2024); the result is the next round's
model. `iterate.json` records, per round, the judge's mean score of what the model sampled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from ..config import StrictModel, dump_config, load_config
from ..judges import make_judge
from ..runtime.device import pick_device
from ..train.config import TrainConfig
from ..train.offline import run_offline
from .label import LabelConfig, label
from .sample import SampleConfig, sample


class IterateConfig(StrictModel):
    model: str
    prompts: str
    judge: str
    output: str
    iterations: int = 2
    n: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_prompts: int | None = None
    mode: Literal["best_vs_worst", "best_vs_rest", "all"] = "best_vs_worst"
    seed: int = 0
    device: str = "auto"
    train: dict[str, Any] = {}  # `prefalign train` keys for every round (method defaults to dpo)


def iterate(cfg: IterateConfig, log=print, progress: bool = True) -> dict:
    if cfg.iterations < 1:
        raise ValueError("iterations must be at least 1")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    judge = make_judge(cfg.judge, pick_device(cfg.device), pairwise_ok=True)  # loaded once for all rounds
    model, rounds = cfg.model, []
    for r in range(1, cfg.iterations + 1):
        folder = out / f"round-{r}"
        log(f"round {r}/{cfg.iterations}: sample from {model}")
        s = sample(SampleConfig(model=model, prompts=cfg.prompts, output=str(folder / "samples.jsonl"), n=cfg.n,
                                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                top_p=cfg.top_p, max_prompts=cfg.max_prompts, seed=cfg.seed + r, device=cfg.device),
                   log)
        lab = label(LabelConfig(samples=str(folder / "samples.jsonl"), judge=cfg.judge, output=str(folder / "pairs.jsonl"),
                                mode=cfg.mode), log, judge=judge)
        if not lab["written"]:
            raise ValueError(f"round {r}: the judge found no preference among the samples (all ties)")
        train_cfg = load_config(TrainConfig, base={"method": "dpo", **cfg.train, "model": model,
                                                   "data": str(folder / "pairs.jsonl"), "output": str(folder / "train")})
        result = run_offline(train_cfg, log=log, progress=progress)
        rounds.append({"round": r, "model": model, "sample": s, "label": lab,
                       "train": {"steps": result.steps, "wall_seconds": result.wall_seconds, "final": result.last}})
        model = str(folder / "train" / "final")
    summary = {"rounds": rounds, "final_model": model}
    (out / "iterate.json").write_text(json.dumps(summary, indent=2))
    log(f"judge mean score of samples by round: {[round(x['label']['mean_score'] or 0, 4) for x in rounds]}; "
        f"final model {model}")
    return summary
