"""`prefalign eval --lm-eval TASKS`: EleutherAI's lm-evaluation-harness on the model and its reference.

The harness scores the models prefalign already loaded (its `HFLM` wraps the objects, nothing is
loaded twice), through its own Python API (`simple_evaluate`), so a score here is the harness's
score of the same weights under the same settings. Its tasks are found by name in its built-in index
or in folders of your own task YAMLs (`--lm-eval-include DIR`); with such folders, the built-in index
(~15k entries, seconds to build) is built only when a task is not found in them.

lm-eval is an optional extra (`pip install 'prefalign[lmeval]'`), imported only when asked for (it
costs about half a second over torch and transformers). A hub task's data set is read by `datasets`,
which honours HF_HUB_OFFLINE=1 (the tests and the demo set it): offline, only data sets already in the cache
(or local files) can be used.

Per reported task T (a task, or a group's aggregate; a tag's tasks one by one), under suites/lm-eval/T/:
score (the task's first metric, e.g. acc for a multiple-choice task), score_stderr (the harness's own
standard error of it), metric (its name as the harness writes it, e.g. "acc,none": metric, filter),
n (items scored) and metrics (every number the harness reported for T), each also with `_reference`.
"""

from __future__ import annotations

import difflib
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ConfigError

INSTALL = "pip install 'prefalign[lmeval]'"


def require() -> None:
    """A clear error, before any model is loaded, where lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401  (the top-level package only: cheap)
    except ImportError:
        raise ConfigError(f"--lm-eval needs EleutherAI's lm-evaluation-harness: {INSTALL}") from None


def task_manager(tasks: list[str], include: list[str]):
    """lm-eval's TaskManager that knows every name in `tasks` (ConfigError naming those it does not),
    after reading each task's data once, so a data set that cannot be read fails before any model loads."""
    require()
    from lm_eval.tasks import TaskManager

    for folder in include:
        if not Path(folder).is_dir():
            raise ConfigError(f"--lm-eval-include {folder}: not a folder of lm-eval task YAML files")
    manager = None
    if include:  # the user's folders alone first: building the built-in index costs seconds
        manager = TaskManager(include_path=list(include), include_defaults=False)
    if manager is None or not all(t in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=list(include) or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        said = "; ".join(f"{t!r}" + (f" (close: {', '.join(h)})" if h else "") for t, h in hints.items())
        where = f" nor in {', '.join(include)}" if include else " (your own task YAMLs: --lm-eval-include DIR)"
        raise ConfigError(f"unknown lm-eval task {said}: not among lm-eval's tasks{where}")
    with _data_errors(tasks):  # the tasks' data sets read once now: one that cannot be read fails before the models
        if hasattr(manager, "load"):  # lm-eval >= 0.4.10 (this was tested on 0.4.13)
            manager.load(list(tasks))
        else:
            from lm_eval.tasks import get_task_dict

            get_task_dict(list(tasks), manager)
    return manager


@contextmanager
def _data_errors(tasks: list[str]):
    try:
        yield
    except ConnectionError as e:  # datasets, offline or unreachable: say what to do
        raise ConfigError(f"lm-eval task(s) {', '.join(tasks)}: a data set could not be fetched ({e}). Offline "
                          "(HF_HUB_OFFLINE=1) or without the network: fetch the data set once online, or give "
                          "a local task (--lm-eval-include DIR) over a local file") from None
    except FileNotFoundError as e:
        raise ConfigError(f"lm-eval task(s) {', '.join(tasks)}: {e}") from None


def run(model, tokenizer, tasks: list[str], manager, *, batch_size: int, limit: int | None = None,
        num_fewshot: int | None = None) -> dict[str, dict[str, Any]]:
    """The harness's results for `model`: {reported task: {score, score_stderr, metric, n, metrics}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with _data_errors(tasks):
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False)
    return summarise(out, tasks)


def _number(v: Any) -> float | None:
    """The harness writes "N/A" for a standard error it did not compute; JSON has no NaN."""
    return float(v) if isinstance(v, (int, float)) and not math.isnan(v) else None


def summarise(out: dict, asked: list[str]) -> dict[str, dict[str, Any]]:
    """One entry per top-level result (a group, not its members; a tag's tasks) and per asked name."""
    results, children = out["results"], out.get("group_subtasks", {})
    inside = {c for kids in children.values() for c in kids}
    summary = {}
    for name, row in results.items():
        if name in inside and name not in asked:
            continue
        metrics = {k: _number(v) for k, v in row.items() if "," in k}
        primary = next((k for k in metrics if "_stderr," not in k), None)
        if primary is None:
            continue
        metric, _, filt = primary.partition(",")
        n = row.get("sample_len", out.get("n-samples", {}).get(name, {}).get("effective"))
        summary[name] = {"score": metrics[primary], "score_stderr": metrics.get(f"{metric}_stderr,{filt}"),
                         "metric": primary, "n": n, "metrics": metrics}
    return summary
