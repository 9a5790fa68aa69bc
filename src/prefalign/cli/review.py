"""`prefalign review`: the labelling and side-by-side review page, and `prefalign review export`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import typer

from .base import _log, app, build, console, fail

review_app = typer.Typer(help="Serve a page where people judge two answers side by side (blind, random sides; "
                              "keys A, B, T tie, X both bad, U undo; several annotators, k per item), saved to "
                              "SQLite; `prefalign review export` writes the judgements as preference data.")
app.add_typer(review_app, name="review")


def _source(pairs: Path | None, samples: Path | None, models: tuple[str, str] | None,
            prompts: Path | None) -> dict[str, Any] | None:
    given = [x for x in (pairs, samples, models) if x]
    if len(given) > 1:
        fail("give one of --pairs, --samples or --models A B --prompts")
    if models and not prompts:
        fail("--models A B needs --prompts FILE (the prompts both models answer)")
    if prompts and not models:
        fail("--prompts goes with --models A B")
    if pairs:
        return {"mode": "pairs", "file": str(pairs.resolve())}
    if samples:
        return {"mode": "samples", "file": str(samples.resolve())}
    if models:
        return {"mode": "arena", "models": list(models), "prompts": str(prompts.resolve())}
    return None


def _arena_items(source: dict[str, Any], settings: list[str]):
    """Both models answer every prompt with the same seeds (`prefalign sample`, n=1)."""
    from ..feedback.sample import SampleConfig, sample
    from ..review.items import from_arena

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, model in enumerate(source["models"]):
            files.append(Path(tmp) / f"{i}.jsonl")
            cfg = build(SampleConfig, dict(model=model, prompts=source["prompts"], n=1, output=str(files[-1])),
                        settings)
            sample(cfg, _log)
        return from_arena(*files, *source["models"])


def _prepare(store, source: dict[str, Any] | None, per_item: int | None, settings: list[str]) -> None:
    """A new file gets its items; an existing one is resumed (the same source, or none given)."""
    from ..review import items as make

    if store.item_count():
        held = store.meta()["source"]
        if source is not None and source != held:
            fail(f"{store.path} holds the items of {json.dumps(held)}; give the same source or none to resume, "
                 "or another -o for a new review")
        if per_item is not None:
            store.set_per_item(per_item)
        _log(f"{store.path}: resuming ({store.item_count()} items)")
        return
    if source is None:
        fail(f"{store.path} holds no items yet: give --pairs FILE, --samples FILE or --models A B --prompts FILE")
    if source["mode"] == "pairs":
        items = make.from_pairs(source["file"], _log)
    elif source["mode"] == "samples":
        items = make.from_samples(source["file"], _log)
    else:
        items = _arena_items(source, settings)
    store.create(items, source, per_item or 1)
    _log(f"{store.path}: {len(items)} items to review")


@review_app.callback(invoke_without_command=True)
def review_cmd(
    ctx: typer.Context,
    pairs: Path | None = typer.Option(None, help="a preference file: judge its two answers again, blind"),
    samples: Path | None = typer.Option(None, help="`prefalign sample` output: completions 1-2, 3-4, ... judged"),
    models: tuple[str, str] | None = typer.Option(None, help="arena: models A B answer --prompts; the summary is "
                                                   "A's human win-rate over B"),
    prompts: Path | None = typer.Option(None, help="with --models: the prompts (a prompt or preference file)"),
    output: Path | None = typer.Option(None, "-o", "--output", help="the review file (SQLite); given again: resume"),
    port: int = typer.Option(8008, help="port to serve on (0: any free port)"),
    host: str = typer.Option("127.0.0.1", help="address to bind; any non-loopback address needs --api-key"),
    api_key: str | None = typer.Option(None, envvar="PREFALIGN_REVIEW_KEY", help="a key the page's API checks "
                                       "(annotators open /?annotator=NAME&key=KEY); needed off loopback"),
    per_item: int | None = typer.Option(None, "--per-item", min=1, help="annotators who judge each item (k; "
                                        "default 1, or what the file was created with)"),
    sample_settings: list[str] | None = typer.Option(None, "--sample", help="arena: a `prefalign sample` "
                                                     "setting key=value (repeatable), e.g. max_new_tokens=64"),
) -> None:
    """Serve the review page: a prompt, two answers on random sides with their names hidden until the
    judgement is saved; A better / B better / tie / both bad (keys A, B, T, X; U undoes)."""
    if ctx.invoked_subcommand is not None:
        return
    if output is None:
        fail("-o labels.sqlite is needed (the file every judgement is saved to)")
    from ..review.server import check_host, serve
    from ..review.store import Store

    check_host(host, api_key)  # before the arena's models sample anything
    source = _source(pairs, samples, models if models and models[0] else None, prompts)
    store = Store(output)
    _prepare(store, source, per_item, list(sample_settings or []))
    serve(store, host, port, _log, api_key=api_key)


@review_app.command("export")
def review_export(
    labels: Path = typer.Argument(..., help="the review file (SQLite)"),
    output: Path = typer.Option(..., "-o", "--output", help="preference file (JSONL) to write"),
    min_agreement: float = typer.Option(0.0, "--min-agreement", help="keep an item only when at least this "
                                        "share of its annotators gave the majority verdict"),
    incomplete: bool = typer.Option(False, "--incomplete", help="also keep items judged fewer than k times"),
    quarantine: Path | None = typer.Option(None, help="set-aside items (default: OUT.quarantine.jsonl)"),
) -> None:
    """Write the judged pairs for `prefalign train`; ties, both-bad and disagreements go to the
    quarantine file with their reason; the summary (kappa, win-rate) to OUT's folder/review.json."""
    from ..review.export import export

    summary = export(labels, output, min_agreement=min_agreement, incomplete=incomplete, quarantine=quarantine)
    e = summary["export"]
    console.print(f"{labels}: {summary['items']} items, {summary['items_judged']} judged = {e['kept']} kept + "
                  f"{sum(e['set_aside'].values())} set aside {e['set_aside']} -> {e['quarantine']}; "
                  f"{e['pairs']} pairs ({e['written_answers']} from written answers) -> {output}", highlight=False)
    print(json.dumps(summary))
