"""prefalign: align language models to preference data (DPO family and PPO-based RLHF), measured side by side.

The Python API (prefalign/api.py), for notebooks and scripts; the CLI is a thin layer over it:

    from prefalign import TrainConfig, EvalConfig, train, evaluate, load_preferences

    cfg = TrainConfig.for_method("dpo", model="models/base", data="pairs.jsonl", output="runs/dpo", beta=0.1)
    run = train(cfg)
    scores = evaluate(EvalConfig(model=str(run.model), data="held_out.jsonl", output="runs/dpo/eval"))

`import prefalign` stays cheap (no torch, no transformers): the API's names load prefalign.api, and
with it torch, the first time one of them is used (PEP 562).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "EvalConfig", "EvalResult", "ModelError", "PrefalignError", "Preferences",
           "Report", "TrainConfig", "TrainResult", "__version__", "evaluate", "generate", "load_preferences", "report",
           "train"]
# the errors cost nothing to import; the rest come with prefalign.api (and torch)
_ERRORS = ("ConfigError", "DataError", "ModelError", "PrefalignError")

if TYPE_CHECKING:  # what type checkers and the API reference see; at run time, __getattr__ below
    from .api import (
        EvalConfig,
        EvalResult,
        Preferences,
        Report,
        TrainConfig,
        TrainResult,
        evaluate,
        generate,
        load_preferences,
        report,
        train,
    )
    from .errors import ConfigError, DataError, ModelError, PrefalignError


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'prefalign' has no attribute {name!r}")
    return getattr(importlib.import_module("prefalign.errors" if name in _ERRORS else "prefalign.api"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _api_function(name: str) -> property:
    """`prefalign.train` and `prefalign.report` are the API's functions, though subpackages of the same
    names exist: the import system binds a subpackage to its parent's attribute when it loads it, and
    `from prefalign import train` would then give the package or the function depending on what was
    imported first. The subpackages stay importable as ever (`from prefalign.train import methods`,
    `from prefalign.train.methods import DPO`); only `prefalign.train.methods` spelt as attribute
    lookups (and `import prefalign.train.methods as m`) reach the function instead."""

    def get(self: ModuleType) -> Any:
        return __getattr__(name)

    def bind(self: ModuleType, value: Any) -> None:
        if not isinstance(value, ModuleType):  # anything but the import system binding the subpackage
            raise AttributeError(f"prefalign.{name} is the API's function; patch prefalign.api.{name} instead")

    return property(get, bind)


class _Package(ModuleType):
    train = _api_function("train")
    report = _api_function("report")


sys.modules[__name__].__class__ = _Package
