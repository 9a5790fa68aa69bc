"""audit.json, audit.md, audit.html and frontier.png from `tasks/audit.py`'s summary: pure rendering.

audit.html is one self-contained file (the plot inlined as a data: URI, no script, no external
style), so it can be mailed or attached to a ticket as it is.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ..runtime.plotting import pyplot
from .audit_figures import LABEL

COLORS = {"dpo": "tab:blue", "dpo_iterative": "tab:purple", "ppo": "tab:orange", "rloo": "tab:green"}


def _n(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ci(mean, ci, digits: int = 3) -> str:
    return _n(mean, digits) + ("" if not ci else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]")


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def plot_frontier(s: dict, path: Path) -> None:
    """Reward against exact KL: each arm's validation sweep (95% bootstrap intervals over prompts) and its
    chosen settings on the test prompts (95% t-intervals over seeds)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for arm in s["config"]["arms"]:
        color = COLORS.get(arm)
        pts = sorted((r for r in s["sweep"] if r["arm"] == arm), key=lambda r: r["kl_per_sequence"])
        x, y = [r["kl_per_sequence"] for r in pts], [r["reward_mean"] for r in pts]
        err = [[m - r["reward_ci95"][0] for m, r in zip(y, pts, strict=True)],
               [r["reward_ci95"][1] - m for m, r in zip(y, pts, strict=True)]]
        ax.errorbar(x, y, yerr=err, marker="o", mfc="none", ls="--", color=color, capsize=2, alpha=0.6,
                    label=f"{LABEL[arm]} sweep (validation)")
        for kind, marker in (("best", "s"), ("matched", "D")):
            a = s["arms"].get(arm, {}).get(kind)
            if not a or (kind == "matched" and a["setting"] == s["arms"][arm]["best"]["setting"]):
                continue
            xe = [[a["kl_per_sequence"] - a["kl_per_sequence_ci95"][0]], [a["kl_per_sequence_ci95"][1] -
                                                                         a["kl_per_sequence"]]]
            ye = [[a["reward_mean"] - a["reward_mean_ci95"][0]], [a["reward_mean_ci95"][1] - a["reward_mean"]]]
            ax.errorbar([a["kl_per_sequence"]], [a["reward_mean"]], xerr=xe, yerr=ye, marker=marker, color=color,
                        capsize=3, ms=7, label=f"{LABEL[arm]} {kind} (test, {len(a['seeds'])} seeds)")
    b = s["base"]
    ax.errorbar([0], [b["reward_mean"]], yerr=None if not b["reward_mean_ci95"] else
                [[b["reward_mean"] - b["reward_mean_ci95"][0]], [b["reward_mean_ci95"][1] - b["reward_mean"]]],
                marker="*", color="black", ms=10, capsize=3, label="base (test)")
    ax.axvline(s["chosen"]["matched_kl"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("exact KL to the base per sequence (nats)")
    ax.set_ylabel("held-out judged reward")
    ax.set_title("reward vs KL: sweep on validation, chosen settings on test")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cost_rows(s: dict) -> list[list[str]]:
    rows = []
    for arm, kinds in s["arms"].items():
        a = kinds["best"]
        energy = _ci(a["energy_joules"], a["energy_joules_ci95"], 0) if a["energy_joules"] is not None \
            else "not measurable on this machine"
        rows.append([LABEL[arm], str(a["setting"]), _ci(a["seconds"], a["seconds_ci95"], 1),
                     _ci(a["cpu_seconds"], a["cpu_seconds_ci95"], 1),
                     _ci(a["device_hours"], a["device_hours_ci95"], 5), _mib(a["peak_memory_bytes"]),
                     f"{a['model_copies']} ({a['model_holds']})", _n(a["tokens_sampled"], 0),
                     _n(a["tokens_trained"], 0), energy, _ci(a["usd"], a["usd_ci95"], 5)])
    return rows


def _ratio_rows(s: dict) -> list[list[str]]:
    rows = []
    for name, c in s["comparisons"].items():
        best = c["best"]
        cells = []
        for key in ("reward_ratio", "device_hours_ratio", "peak_memory_bytes_ratio", "usd_ratio",
                    "energy_joules_ratio"):
            r = best.get(key)
            cells.append("-" if r is None else _ci(r["mean"], r["ci95"], 3))
        d = best.get("reward_difference")
        one, other = name.split(" vs ")
        rows.append([f"{LABEL[one]} vs {LABEL[other]}"] + cells + ["-" if d is None else _ci(d["mean"], d["ci95"], 3)])
    return rows


def _quality_rows(s: dict) -> list[list[str]]:
    b = s["base"]
    rows = [["base", "-", "-", _ci(b["reward_mean"], b["reward_mean_ci95"]), "-", "0", _n(b["perplexity"], 2)]]
    for arm, kinds in s["arms"].items():
        for kind, a in kinds.items():
            rows.append([LABEL[arm], kind, str(a["setting"]), _ci(a["reward_mean"], a["reward_mean_ci95"]),
                         _ci(a["win_rate"], a["win_rate_ci95"]),
                         _ci(a["kl_per_sequence"], a["kl_per_sequence_ci95"], 2),
                         _ci(a["perplexity"], a["perplexity_ci95"], 2)])
    return rows


def _steps(st: dict) -> str:
    """A training stage's steps, and why it stopped where that was not its max_steps."""
    if st.get("steps") is None:
        return "-"
    return str(st["steps"]) + ("" if st.get("stopped") in (None, "max_steps") else f" ({st['stopped']})")


def _stage_rows(s: dict) -> list[list[str]]:
    return [[st["stage"], st["arm"] or "-", str(st["seed"]), f"{st['seconds']:.1f}", f"{st['cpu_seconds']:.1f}",
             f"{st['device_hours']:.5f}", _mib(st["peak_memory_bytes"]), _mib(st["baseline_rss_bytes"]),
             "-" if st["model_copies"] is None else f"{st['model_copies']} ({st['model_holds']})",
             str(st["tokens_sampled"] or "-"), str(st["tokens_trained"] or "-"), _steps(st),
             "not measurable" if st["energy_joules"] is None else f"{st['energy_joules']:.0f}", _n(st["usd"], 5)]
            for st in s["stages"]]


def _sweep_rows(s: dict) -> list[list[str]]:
    return [[LABEL[r["arm"]], f"{r['setting_name']}={r['setting']}", _ci(r["reward_mean"], r["reward_ci95"]),
             _n(r["kl_per_sequence"], 2), _n(r["win_rate"]), _n(r["perplexity"], 2)] for r in s["sweep"]]


def tables(s: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    return [
        ("Quality on the test prompts (mean [95% t-interval over seeds]; KL: exact, to the base, nats per sequence)",
         ["arm", "choice", "setting", "reward", "win-rate vs base", "KL/seq", "perplexity"], _quality_rows(s)),
        ("Cost end to end of each arm's best setting (mean [95% t-interval over seeds]; peak: largest stage)",
         ["arm", "setting", "seconds", "CPU seconds", f"device-hours ({s['hardware']['unit']})", "peak MiB",
          "model copies (what)", "tokens sampled", "tokens trained", "energy J", "USD"], _cost_rows(s)),
        ("Each DPO arm over each RLHF arm, seed by seed (ratio < 1: the DPO arm needs less; geometric mean "
         "[95% t-interval on "
         "log ratios over seeds]; reward difference: mean [95% t-interval])",
         ["comparison", "reward ratio", "device-hours ratio", "peak memory ratio", "USD ratio", "energy ratio",
          "reward difference"], _ratio_rows(s)),
        ("Validation sweep (first seed; reward: 95% bootstrap interval over prompts)",
         ["arm", "setting", "reward", "KL/seq", "win-rate", "perplexity"], _sweep_rows(s)),
        ("Every stage, each in its own process",
         ["stage", "arm", "seed", "seconds", "CPU seconds", "device-hours", "peak MiB", "RSS at start MiB",
          "model copies (what)", "tokens sampled", "tokens trained", "steps", "energy J", "USD"],
         _stage_rows(s)),
    ]


def _facts(s: dict) -> list[str]:
    hw, e = s["hardware"], s["energy"]
    price = hw["price"]
    return [
        f"Hardware: {hw['device_name']} x {hw['devices']} ({hw['unit']}s); price "
        + (f"${price['usd_per_hour']}/{price['unit']} ({price.get('source')}, {price.get('date')})" if price
           else hw["price_missing"]),
        f"Energy: {e['status']}",
        "Peak memory on a CPU is the stage's peak RSS, which includes what its process held at its start "
        "(torch and transformers imported by the forkserver it is forked from): that is `RSS at start`, "
        "not subtracted.",
        "CPU seconds: user + system time of the stage's process; device-hours: wall seconds x devices / 3600.",
        "Chosen on the validation prompts: " + "; ".join(f"{LABEL[arm]}: {c['reason']}"
                                                          for arm, c in s["chosen"]["arms"].items()),
        f"Whole audit {s['seconds']:.0f} s; load average (1, 5, 15 min) {s['load_average_start']} at the start, "
        f"{s['load_average_end']} at the end.",
    ]


def markdown(s: dict) -> str:
    lines = ["# prefalign audit: DPO vs the RLHF arm", "", "## Verdict", ""]
    lines += [f"- {x}" for x in s["verdict"]["sentences"]]
    lines += ["", "![reward vs KL](frontier.png)", ""] + [f"- {x}" for x in _facts(s)]
    for title, head, rows in tables(s):
        lines += ["", f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Every figure: audit.json (keys: docs/audit.md)."]
    return "\n".join(lines) + "\n"


def page(s: dict, png: bytes) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>prefalign audit</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}</style></head><body>",
             "<h1>prefalign audit: DPO vs the RLHF arm</h1><h2 id='verdict'>Verdict</h2><ul>"]
    parts += [f"<li>{e(x)}</li>" for x in s["verdict"]["sentences"]]
    parts.append(f"</ul><img id='frontier' alt='reward vs KL' src='data:image/png;base64,"
                 f"{base64.b64encode(png).decode()}'><ul>")
    parts += [f"<li>{e(x)}</li>" for x in _facts(s)]
    parts.append("</ul>")
    for title, head, rows in tables(s):
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    parts.append("<p>Every figure: audit.json (keys: docs/audit.md).</p></body></html>")
    return "\n".join(parts)


def write_reports(summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(summary, indent=2))
    plot_frontier(summary, out / "frontier.png")
    (out / "audit.md").write_text(markdown(summary))
    (out / "audit.html").write_text(page(summary, (out / "frontier.png").read_bytes()))
