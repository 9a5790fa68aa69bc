"""`prefalign report RUN_DIR [RUN_DIR ...] -o OUT`: one report over training runs and evaluations.

A folder may hold a training run (run.json, metrics.jsonl, config.yaml), an evaluation (eval.json),
or both (eval.json directly or in eval/), and/or a human review (review.json, from `prefalign review
export`: an arena's win-rate of model A over B by people, shown as human_win_rate next to the judge's
win_rate). Written to OUT:
  curves.png         training curves per run: loss, reward accuracy (or RL reward), margins (or
                     RL sampled k3 KL), and the exact KL to the reference the monitor measured
  frontier.png       held-out reward against KL to the reference, one point per evaluated run (the
                     DPO paper's Figure 2 picture)
  report.md          tables + the two images
  report.html        the same, self-contained (images inlined), opens offline
  report.json        every number in the tables
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..runtime.plotting import pyplot
from ..train.methods import METHODS

CURVES = [  # (title, offline metric, RL metric)
    ("loss", "loss", "loss"),
    ("reward accuracy / RL reward", "rewards/accuracy", "ppo/reward"),
    ("reward margin / RL sampled KL (k3) per sequence", "rewards/margins", "ppo/kl"),
    ("exact KL to the reference per sequence (monitor)", "kl/policy_ref_seq", "kl/policy_ref_seq"),
]
TRAIN_COLUMNS = ["method", "steps", "wall_seconds", "tokens_per_s", "peak_memory_gb", "model_copies"]
EVAL_COLUMNS = ["preference_accuracy", "reward_mean", "win_rate", "win_rate_ci95", "kl_per_sequence", "kl_per_token",
                "perplexity", "perplexity_reference", "mean_length"]
# review.json's keys (the same as eval.json's) -> the report's, so a judge's and people's win-rates sit side by side
HUMAN_COLUMNS = {"win_rate": "human_win_rate", "win_rate_ci95": "human_win_rate_ci95",
                 "win_rate_baseline": "human_win_rate_baseline", "judgements": "human_judgements"}


def _read_json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def load_run(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder")
    evaluation = _read_json(folder / "eval.json") or _read_json(folder / "eval" / "eval.json")
    run = _read_json(folder / "run.json")
    review = _read_json(folder / "review.json")
    metrics_path = folder / "metrics.jsonl"
    metrics = (
        [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] if metrics_path.exists() else []
    )
    config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").exists() else {}
    if run is None and evaluation is None and review is None:
        raise ConfigError(f"{folder}: holds neither a training run (run.json) nor an evaluation (eval.json) nor a "
                          "review (review.json)")
    return {"name": folder.name, "path": str(folder), "run": run, "eval": evaluation, "metrics": metrics,
            "config": config or {}, "review": review}


def summarise(r: dict[str, Any]) -> dict[str, Any]:
    """One table row: training cost, final training metrics, evaluation metrics."""
    run, ev, cfg, review = r["run"] or {}, r["eval"] or {}, r["config"], r.get("review") or {}
    # an evaluation with no training run: the reference itself (evaluated against itself), or a model
    method = run.get("method") or cfg.get("method") or (
        "human review" if review and not ev else "reference" if ev.get("model") == ev.get("reference") else "eval")
    row: dict[str, Any] = {"run": r["name"], "method": method}
    hp = {k: cfg[k] for k in ("beta", "kl_coef", "learning_rate") if k in cfg}
    row["settings"] = ", ".join(f"{k}={v}" for k, v in hp.items()) or "-"
    if run:
        peak = run.get("peak_memory_bytes")
        row.update({"steps": run.get("steps"), "wall_seconds": run.get("wall_seconds"),
                    "tokens_per_s": run.get("tokens_per_s"), "peak_memory_gb": peak / 1024**3 if peak else None,
                    "model_copies": run.get("model_copies")})
    train_rows = [m for m in r["metrics"] if m.get("step", 0) > 0 and "loss" in m]
    monitored = [m for m in r["metrics"] if "kl/policy_ref_seq" in m]
    if monitored:
        row["final kl/policy_ref_seq"] = monitored[-1]["kl/policy_ref_seq"]
    if train_rows:
        last = train_rows[-1]
        for key in ("loss", "rewards/accuracy", "rewards/margins", "ppo/reward", "ppo/kl", "reward_model/accuracy",
                    "reward/accuracy"):  # the reward model's accuracy, as runs before the rename wrote it
            if key in last:
                row[f"final {key}"] = last[key]
    for key in EVAL_COLUMNS:
        if key in ev:
            row[key] = ev[key]
    for key, value in ev.items():
        if key.startswith("suites/") and key.endswith(("/score", "/score_reference")):  # retention beside reward
            row[key] = value
    if review.get("mode") == "arena":
        row.update({name: review.get(key) for key, name in HUMAN_COLUMNS.items()})
    return row


def _series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(m["step"], m[key]) for m in metrics if key in m and m.get("step", 0) > 0 and m[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(runs: list[dict], path: Path) -> bool:
    plt = pyplot()

    if not any(r["metrics"] for r in runs):
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, offline_key, rl_key) in zip(axes.flat, CURVES, strict=True):
        for r in runs:
            spec = METHODS.get(r["run"].get("method")) if r["run"] else None
            key = rl_key if spec is not None and spec.trainer == "rl" else offline_key
            xs, ys = _series(r["metrics"], key)
            if xs:
                ax.plot(xs, ys, label=f"{r['name']} ({key})")
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_frontier(rows: list[dict], path: Path) -> bool:
    plt = pyplot()

    pts = [
        r
        for r in rows
        if isinstance(r.get("reward_mean"), (int, float)) and isinstance(r.get("kl_per_sequence"), (int, float))
    ]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    for method in sorted({r["method"] for r in pts}):
        mine = [r for r in pts if r["method"] == method]
        ax.scatter([r["kl_per_sequence"] for r in mine], [r["reward_mean"] for r in mine], label=method, s=40)
        for r in mine:
            ax.annotate(r["run"], (r["kl_per_sequence"], r["reward_mean"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    ax.set_xlabel("KL(policy || reference) per sequence, nats")
    ax.set_ylabel("held-out reward (judge)")
    ax.set_title("reward vs KL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_cell(x) for x in v) + "]"
    return "-" if v is None else str(v)


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    cols = ["run"] + [c for c in dict.fromkeys(k for r in rows for k in r) if c != "run"]
    return cols, [[_cell(r.get(c)) for c in cols] for r in rows]


def build_report(folders: list[str | Path], out: str | Path, log=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(f) for f in folders]
    rows = [summarise(r) for r in runs]
    images = {name: out / f"{name}.png" for name in ("curves", "frontier")}
    drawn = {"curves": plot_curves(runs, images["curves"]), "frontier": plot_frontier(rows, images["frontier"])}
    cols, cells = _table(rows)
    md = ["# prefalign report", "", f"Runs: {', '.join(r['path'] for r in runs)}", "", "## Side by side", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(c) + " |" for c in cells]
    for name, title in (("frontier", "Reward vs KL"), ("curves", "Training curves")):
        if drawn[name]:
            md += ["", f"## {title}", "", f"![{title}]({name}.png)"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(_html(cols, cells, {k: images[k] for k, ok in drawn.items() if ok}, runs))
    report = {"runs": rows, "images": {k: str(images[k]) for k, ok in drawn.items() if ok}}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log(f"report -> {out / 'report.html'} ({len(runs)} runs)")
    return report


def _html(cols: list[str], cells: list[list[str]], images: dict[str, Path], runs: list[dict]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{e(x)}</td>" for x in row) + "</tr>" for row in cells)
    figs = "".join(
        f'<h2>{e(name)}</h2><img alt="{e(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}">' for name, path in images.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>prefalign report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#f4f4f4}}td:first-child{{text-align:left}}
img{{max-width:100%;border:1px solid #eee;margin:1em 0}}</style></head>
<body><h1>prefalign report</h1><p>{len(runs)} runs: {e(", ".join(r["path"] for r in runs))}</p>
<h2>Side by side</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{figs}</body></html>
"""
