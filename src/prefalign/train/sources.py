"""A run's data as its config names it: one file, a mixture of sources (`data`, `prompts`), named eval sets
(`eval_data`), read, tokenized and mixed here (data/mixture.py; docs/data-mixtures.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..data import ReadOptions, load_prompts, load_records
from ..data.batches import TokenizedData, tokenize_records
from ..data.mixture import DataSource, SourceUse, check_readable, label_of, mix, sources_of
from ..data.records import Problem, Text, json_line
from ..errors import ConfigError, DataError
from ..runtime.distributed import World


def _options(source: DataSource) -> ReadOptions:
    return ReadOptions(format=source.format, split=source.split)


def _named(label: str, e: Exception, plain: bool) -> Exception:
    """The error of one source, prefixed with its entry (data[1]) when the data is a list."""
    return e if plain else type(e)(f"{label}: {e}")


def load_examples(value, field: str, cfg, tokenizer, unit: str, out: Path, name: str, log: Callable[[str], None],
                  world: World = World(), one: bool = False) -> tuple[TokenizedData, list[SourceUse]]:
    """Every source of `value` (a path or a list of sources) read and tokenized on its own (a KTO
    example's mismatched completion comes from its own source), then mixed with the run's seed. Bad
    records of every source go to OUT/<name>_problems.jsonl, each naming its file and line. Errors name
    the source as `field[i]`, or as `field` for a plain path or `one` source (a named eval set)."""
    sources, plain = sources_of(value, cfg.format), isinstance(value, str)
    parts, problems, labels = [], [], []
    for i, source in enumerate(sources):
        label = field if one else label_of(value, field, i)
        check_readable(source, label)
        try:
            records, bad = load_records(source.path, _options(source))
            data = tokenize_records(tokenizer, records, max_length=cfg.max_length,
                                    max_prompt_length=cfg.max_prompt_length, unit=unit,
                                    assistant_turns=getattr(cfg, "assistant_turns", "last"))  # SFT's own key
        except (ConfigError, DataError) as e:
            raise _named(label, e, plain) from None
        bad += data.problems
        problems += bad
        if not data.examples:
            raise DataError(f"{'' if plain else label + ': '}{source.path}: no usable records")
        log(f"{source.path}: {len(data)} examples, {data.truncated} truncated to max_length={cfg.max_length}"
            + (f", {len(bad)} bad records set aside" if bad and not plain else ""))
        parts.append(data.examples)
        labels.append(label)
    examples, uses = mix(parts, sources, cfg.seed, labels)
    if problems:
        path = out / f"{name}_problems.jsonl"
        if world.main:
            path.write_text("".join(json_line(p.to_json()) + "\n" for p in problems), encoding="utf-8")
        log(f"{value if plain else field}: {len(problems)} bad records set aside (first: {problems[0]}); all listed "
            f"in {path}")
    if not plain:
        log(f"{field}: {len(examples)} examples mixed from " + ", ".join(
            f"{u.source.path} {u.used}/{u.available}" for u in uses))
    truncated = sum(any(s.truncated for s in e.seqs) for e in examples)
    return TokenizedData(examples, problems, truncated), uses


def load_eval_sets(cfg, tokenizer, unit: str, out: Path, log: Callable[[str], None],
                   world: World = World()) -> dict[str | None, TokenizedData]:
    """`eval_data` as {None: the set} (a plain path: metrics eval/...) or {name: set} (eval/<name>/...),
    in the config's order; empty without eval_data."""
    if cfg.eval_data is None:
        return {}
    if isinstance(cfg.eval_data, str):
        return {None: load_examples(cfg.eval_data, "eval_data", cfg, tokenizer, unit, out, "eval_data", log,
                                    world)[0]}
    return {name: load_examples([source], f"eval_data.{name}", cfg, tokenizer, unit, out, f"eval_data_{name}", log,
                                world, one=True)[0] for name, source in cfg.eval_data.items()}


def _prompts_of(source: DataSource, label: str, plain: bool) -> tuple[list[Text], list[Problem]]:
    check_readable(source, label)
    try:
        return load_prompts(source.path, _options(source))
    except (ConfigError, DataError) as e:
        raise _named(label, e, plain) from None


def load_prompt_mix(cfg, out: Path, log: Callable[[str], None],
                    world: World = World()) -> tuple[list[Text], list[SourceUse]]:
    """RL's `prompts`: the distinct prompts of each source, mixed as `data` is."""
    sources, plain = sources_of(cfg.prompts, cfg.format), isinstance(cfg.prompts, str)
    parts, problems, labels = [], [], []
    for i, source in enumerate(sources):
        label = label_of(cfg.prompts, "prompts", i)
        prompts, bad = _prompts_of(source, label, plain)
        problems += bad
        if not prompts:
            raise DataError(f"{'' if plain else label + ': '}{source.path}: no usable prompts")
        parts.append(prompts)
        labels.append(label)
    if problems:
        if world.main:
            (out / "prompts_problems.jsonl").write_text("".join(json_line(p.to_json()) + "\n" for p in problems),
                                                        encoding="utf-8")
        log(f"{cfg.prompts if plain else 'prompts'}: {len(problems)} bad rows set aside (first: {problems[0]})")
    prompts, uses = mix(parts, sources, cfg.seed, labels)
    if not plain:
        log(f"prompts: {len(prompts)} mixed from " + ", ".join(f"{u.source.path} {u.used}/{u.available}" for u in uses))
    return prompts, uses


def monitor_prompts(cfg) -> list[Text]:
    """The KL monitor's prompts: eval_data's (a named set: the first), else the training data's; several
    training sources are taken in turn, one prompt of each, so every source is in the first few."""
    value, field = (cfg.data, "data") if cfg.eval_data is None else (cfg.eval_data, "eval_data")
    if isinstance(value, dict):
        name, source = next(iter(value.items()))
        value, field = [source], f"eval_data.{name}"
    lists = [_prompts_of(s, label_of(value, field, i), isinstance(value, str))[0]
             for i, s in enumerate(sources_of(value, cfg.format))]
    return [p[j] for j in range(max(map(len, lists))) for p in lists if j < len(p)]
