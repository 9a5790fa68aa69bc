"""`prefalign recipe FILE.yaml`: named training stages run in order, a later stage reading an earlier
one's result as `${name}` (its final/ folder). For example DPO first, then PPO starting from (and
anchored to) the DPO model:
    output: runs/hybrid
    stages:
      dpo: {method: dpo, model: base/, data: pairs.jsonl, lora: true}
      ppo: {method: ppo, model: ${dpo}, prompts: pairs.jsonl, reward: rewards.py:score, lora: true}

Every stage is validated before the first one starts, so a typo in stage 2 costs no training time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..config import ConfigError, apply_overrides, read_yaml, shown
from .methods import train_config
from .run import train

REF = re.compile(r"\$\{(\w[\w-]*)\}")


def _resolve(value: Any, finals: dict[str, str], stage: str) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(1) not in finals:
                raise ConfigError(f"stage {stage}: ${{{m.group(1)}}} names no earlier stage")
            return finals[m.group(1)]
        return REF.sub(sub, value)
    return value


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Path, list[tuple[str, Any]]]:
    raw = read_yaml(path, "recipe") or {}
    shape = f"{path}: a recipe is {{output: DIR, stages: {{name: train config, ...}}}}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{shape}, not {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    unknown = set(raw) - {"output", "stages"}
    if unknown or not isinstance(raw.get("stages"), dict) or not isinstance(raw.get("output"), str) \
            or not raw["output"]:
        raise ConfigError(shape + (f"; unknown keys {sorted(map(str, unknown))}" if unknown else ""))
    out = Path(raw["output"])
    finals: dict[str, str] = {}
    stages = []
    for name, stage in raw["stages"].items():
        if not isinstance(name, str):  # it names the stage's folder
            raise ConfigError(f"{path}: stage {shown(name)}: a stage's name is text (quote it: '{name}':)")
        if not isinstance(stage, dict):
            raise ConfigError(f"{path}: stage {name}: expected a mapping of train config keys")
        data = {k: _resolve(v, finals, name) for k, v in stage.items()}
        data.setdefault("output", str(out / name))
        stages.append((name, train_config(data, f"{path}: stage {name}")))
        finals[name] = str(Path(data["output"]) / "final")
    return out, stages


def run_recipe(path: str | Path, overrides: list[str] | None = None, log=print, progress: bool = True,
               after_stage=None) -> dict:
    """Each stage trained in order; `after_stage(output)` runs as each ends (the CLI: its model card and
    push), so a later stage's failure leaves the earlier ones finished."""
    out, stages = load_recipe(path, overrides)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, cfg in stages:
        log(f"stage {name}: {cfg.method} -> {cfg.output}")
        result = train(cfg, log=log, progress=progress)
        if after_stage is not None:
            after_stage(cfg.output)
        summary[name] = {"method": cfg.method, "output": cfg.output, "steps": result.steps,
                         "wall_seconds": result.wall_seconds, "final": result.last}
    (out / "recipe.json").write_text(json.dumps(summary, indent=2))
    return summary
