"""The Python API: train, evaluate, read preference data, sample and report from a notebook or a script.

The CLI's `train`, `eval` and `report` commands are thin layers over these functions: a config built
here and one built from the same YAML on the command line run the same code and write the same
folders. Every name is re-exported by the package (`from prefalign import train, TrainConfig`);
`examples/python_api.py` uses them end to end.

Configs are the typed pydantic models the CLI validates: `TrainConfig.for_method("dpo", ...)` (or
`TrainConfig.from_yaml(path)`) for training, `EvalConfig(...)` for evaluation. Every function also
takes a mapping or a YAML path, with keyword overrides. A misspelt key, a key of another method or a
bad value raises `ConfigError` naming the key; unusable data raises `DataError` naming the file and
line; both are `ValueError`s.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field
from transformers.utils import logging as hf_logging

from .config import Runtime, Sampling, load_config, read_mapping
from .data import ReadOptions, load_records
from .data.records import Problem, Record, Text
from .errors import ConfigError
from .eval.evaluate import EvalConfig
from .eval.evaluate import evaluate as run_eval
from .models.generate import encode_prompt
from .models.generate import generate as sample_ids
from .models.hub import push_final
from .models.load import load_model, load_tokenizer_for
from .report.build import build_report
from .report.card import write_card
from .runtime.device import set_up
from .runtime.precision import autocast_for
from .train.config import RunConfig
from .train.loop import LoopResult
from .train.methods import train_config
from .train.run import train as run_train
from .train.trackers import attach_report

__all__ = ["EvalConfig", "EvalResult", "Preferences", "Report", "TrainConfig", "TrainResult", "evaluate", "generate",
           "load_preferences", "report", "train"]

Log = Callable[[str], None]

TrainConfig = RunConfig
"""The base class of every method's training config (`DPO`, `PPO`, ... in prefalign.train.methods).
Build one with `TrainConfig.for_method(name, **fields)` or `TrainConfig.from_yaml(path, **fields)`;
`prefalign config show NAME` lists a method's keys."""


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class TrainResult:
    """What a training run left behind."""

    output: Path  # the run folder: config.yaml, metrics.jsonl, run.json, final/, checkpoints/
    config: RunConfig  # the validated config that ran
    summary: dict[str, Any]  # run.json: steps, stopped, wall_seconds, tokens_per_s, peak_memory_bytes, final, ...

    @property
    def model(self) -> Path:
        """The trained model (`output/final`): a LoRA adapter or a full HF folder, what `evaluate`,
        `generate`, `prefalign serve` and `prefalign export` take."""
        return self.output / "final"

    def metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl, one per logged step (keys defined in docs/metrics.md)."""
        return _read_jsonl(self.output / "metrics.jsonl")


@dataclass(frozen=True)
class EvalResult:
    """What an evaluation measured: `metrics` is eval.json (keys defined in docs/metrics.md)."""

    output: Path  # eval.json, eval.md, samples.jsonl, eval_config.yaml
    metrics: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]

    def samples(self) -> list[dict[str, Any]]:
        """Every generation the evaluation sampled (samples.jsonl), for reading."""
        return _read_jsonl(self.output / "samples.jsonl")


@dataclass(frozen=True)
class Preferences(Sequence):
    """The good records of a preference file, and every problem found on the way (nothing is
    dropped silently: `prefalign data curate` writes the same problems to its quarantine file)."""

    records: list[Record]  # PreferencePair or UnpairedExample (KTO), in file order
    problems: list[Problem] = field(default_factory=list)  # each names its file, line and field

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):  # type: ignore[override]
        return self.records[i]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    @property
    def invalid(self) -> int:
        """Rows that could not be used (quarantined by `prefalign data curate`)."""
        return len(self.problems)

    def by_kind(self) -> dict[str, int]:
        """Problems by kind (json, missing, empty, tie, utf8, roles, ...)."""
        return dict(Counter(p.kind for p in self.problems))


@dataclass(frozen=True)
class Report:
    """A side-by-side report of runs and evaluations."""

    output: Path  # report.md, report.html, report.json and the PNG plots
    rows: list[dict[str, Any]]  # one per folder: cost, final training metrics, evaluation metrics

    @property
    def html(self) -> Path:
        return self.output / "report.html"


def _mapping(config: Mapping[str, Any] | str | Path, fields: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A config given as a mapping or a YAML path, with keyword `fields` over it, and where it came from."""
    if isinstance(config, (str, Path)):
        return {**read_mapping(config), **fields}, str(config)
    if isinstance(config, Mapping):
        return {**config, **fields}, "config"
    raise ConfigError(f"a config is a config object, a mapping or a YAML path, not {type(config).__name__}")


def train(config: RunConfig | Mapping[str, Any] | str | Path, /, *, log: Log | None = print, progress: bool = True,
          card: bool = True, command: str | None = None, **overrides: Any) -> TrainResult:
    """Train with any registered method and return the run.

    `config` is a `TrainConfig` (`TrainConfig.for_method("dpo", model=..., data=..., output=...)`),
    a mapping with a `method` key (default dpo) or a YAML file, as `prefalign train` reads it;
    `overrides` are keys set over it (`max_steps=10`). Under torchrun each process calls this.
    `log=None` is silent; `progress=False` draws no progress bar. When the run ends, `finish_run`
    writes its model card (`card=False`: none, and no push) and, with `push_to_hub`, uploads final/;
    `command` is recorded in run.json as the command line that reproduces the run.
    """
    if isinstance(config, RunConfig):
        if not hasattr(config, "method"):
            raise ConfigError("a bare TrainConfig has no method: build it with TrainConfig.for_method(NAME, ...)")
        cfg = train_config({**config.model_dump(), **overrides}, "train()") if overrides else config
    else:
        cfg = train_config(*_mapping(config, overrides))
    with _load_bars(progress):
        loop: LoopResult = run_train(cfg, log=log or _silent, progress=progress)
    if card:
        finish_run(cfg.output, command=command, log=log)
    out = Path(cfg.output)
    summary_file = out / "run.json"  # written by the first process, before every process returns
    # the other processes do not read it: rank 0 may be rewriting it (finish_run) as they return
    main = int(os.environ.get("RANK", "0")) == 0
    summary = json.loads(summary_file.read_text()) if main and summary_file.exists() else {
        "method": cfg.method, "steps": loop.steps, "stopped": loop.stopped, "skipped_steps": loop.skipped_steps,
        "wall_seconds": loop.wall_seconds, "tokens": loop.tokens, "final": loop.last}
    return TrainResult(out, cfg, summary)


def finish_run(run: str | Path, *, command: str | None = None, log: Log | None = print) -> Path | None:
    """The end of a training run, on one process (the main one, or rank 0 under a launcher): run.json's
    `command` (when given), final/README.md (the model card, with the data measured afresh), then,
    when the run's config asks for it, the upload of final/ to the Hub (the very last act, so the card
    goes with it). Returns the card's path (None on the other ranks)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    out, say = Path(run), log or _silent
    if command is not None:
        summary = json.loads((out / "run.json").read_text())
        tmp = out / "run.json.tmp"  # replaced whole: a reader never sees it half-written
        tmp.write_text(json.dumps({**summary, "command": command}, indent=2))
        os.replace(tmp, out / "run.json")
    card = write_card(out, fresh_stats=True)
    say(f"model card -> {card}")
    cfg = train_config(read_mapping(out / "config.yaml"), str(out / "config.yaml"))
    if cfg.push_to_hub:
        say(f"pushed {out / 'final'} -> {push_final(out / 'final', cfg.hub_repo_id, cfg.hub_private, say)}")
    return card


def evaluate(config: EvalConfig | Mapping[str, Any] | str | Path, /, *, log: Log | None = print,
             progress: bool = True, **overrides: Any) -> EvalResult:
    """Score a model as `prefalign eval` does and return eval.json's metrics.

    `config` is an `EvalConfig(model=..., output=..., data=...)`, a mapping or a YAML file;
    `overrides` are keys set over it. What runs depends on what is given: `data` (held-out pairs:
    preference accuracy, then generations and perplexity on their prompts), `prompts`, `text`,
    `judge`, `suites`.
    """
    if isinstance(config, EvalConfig):
        cfg = EvalConfig(**{**config.model_dump(), **overrides}) if overrides else config
    else:
        data, source = _mapping(config, overrides)
        cfg = load_config(EvalConfig, base=data, source=source)
    with _load_bars(progress):
        run_eval(cfg, log=log or _silent, progress=progress)
    out = Path(cfg.output)  # eval.json as scripts read it (JSON's lists, not the evaluator's tuples)
    return EvalResult(out, json.loads((out / "eval.json").read_text()))


def load_preferences(path: str | Path, *, format: str = "auto", reader: str = "auto", split: str | None = None,
                     ranked: str = "best_vs_rest") -> Preferences:
    """Read and validate a preference file or folder, as training reads it.

    `format` is the record shape (auto, pairs, conversation, hh, sharegpt, kto, sft, ranked),
    `reader` the file type (auto, jsonl, json, csv, parquet, arrow: a `datasets.save_to_disk`
    folder, whose `split` picks one split), `ranked` how ranked answers become pairs
    (best_vs_rest, best_vs_worst, all). Bad rows are returned as problems, not raised; a file that
    cannot be read at all raises `DataError`.
    """
    opts = ReadOptions(format=format, reader=reader, split=split, ranked=ranked)
    records, problems = load_records(path, opts)
    return Preferences(records, problems)


class GenerateConfig(Runtime, Sampling):
    """generate()'s settings, validated like every other config's."""

    max_prompt_length: int = Field(256, ge=1)
    batch_size: int = Field(16, ge=1)


def generate(model: str | Path, prompts: Text | Sequence[Text], *, max_new_tokens: int = 32,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, device: str = "auto",
             precision: str = "auto", batch_size: int = 16, max_prompt_length: int = 256) -> list[str]:
    """One sampled completion per prompt (temperature 0: greedy) from a model folder or a LoRA run's
    `final/`, as `prefalign sample` draws them: seeded, batched, KV cache. A prompt is text or a list
    of chat messages ({"role", "content"}), which go through the tokenizer's chat template."""
    single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], dict))
    items: list[Text] = [prompts] if single else list(prompts)  # type: ignore[list-item]
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                      device=device, precision=precision, batch_size=batch_size, max_prompt_length=max_prompt_length)
    dev = set_up(cfg)
    tokenizer = load_tokenizer_for(str(model))
    with _load_bars(False):
        net = load_model(str(model), device=dev).eval()
    ids = [encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in items]
    texts: list[str] = []
    for b, start in enumerate(range(0, len(ids), cfg.batch_size)):
        roll = sample_ids(net, tokenizer, ids[start:start + cfg.batch_size], Sampling.of(cfg),
                          seed=cfg.seed * 1_000_003 + b, device=dev, autocast=autocast_for(cfg.precision, dev))
        texts += roll.completion_texts
    return texts


def report(folders: Sequence[str | Path], output: str | Path, *, trackers: bool = True,
           log: Log | None = print) -> Report:
    """`prefalign report`: a side-by-side table, training curves and the reward-vs-KL plot of run
    and evaluation folders, written to `output` (report.md, report.html, report.json, PNGs).
    With `trackers`, the training runs' experiment trackers (their trackers.json) get the plots and
    report.html as artifacts."""
    built = build_report(list(folders), output, log or _silent)
    if trackers:
        attach_report([Path(f) for f in folders], [*map(Path, built["images"].values()), Path(output) / "report.html"],
                      log or _silent)
    return Report(Path(output), built["runs"])


def _silent(_: str) -> None:
    pass


@contextmanager
def _load_bars(progress: bool) -> Iterator[None]:
    """transformers' own per-load bars follow `progress` too (the CLI turns them off for good)."""
    was = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
