"""The body of a model card (report/card.py): one function per section, each from one file of the run
folder, printing what the file holds and nothing else. Keys are spelled as docs/metrics.md defines them."""

from __future__ import annotations

import json
from typing import Any

import yaml

from ..train.methods import citations, own_keys
from .card_sources import Sources, hub_id

# the shared keys worth a row of their own (every key is in the config block below the table)
TRAINING_KEYS = ["learning_rate", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm", "max_steps",
                 "batch_size", "grad_accum", "max_length", "max_prompt_length", "reference", "lora", "dtype",
                 "precision", "seed", "samples_per_prompt", "kl_coef", "kl_target", "kl_penalty", "ppo_epochs",
                 "num_minibatches", "clip_range", "temperature", "max_new_tokens", "reward"]
COUNTS = ["records", "prompts", "valid", "invalid", "pairs", "unpaired", "duplicates", "conflicts", "ties",
          "chosen_longer_share"]


def body(src: Sources) -> str:
    parts = [intro(src), method(src), data(src), evaluation(src), training_metrics(src), cost(src),
             reproduce(src), usage(src), citation(src)]
    return "\n\n".join(p.strip() for p in parts if p) + "\n"


def num(v: Any) -> str:
    """A number as the card prints it: 4 significant digits; a [low, high] pair as an interval."""
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float, list, tuple)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(num(x) for x in v) + "]"
    return str(v) if isinstance(v, int) else f"{v:.4g}"


def value(v: Any) -> str:
    """A config value exactly (hyperparameters are read back from the card): a string as it is, else JSON."""
    return v if isinstance(v, str) else json.dumps(v)


def table(head: list[str], rows: list[list[Any]]) -> str:
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows])


def details(summary: str, fence: str, text: str) -> str:
    return f"<details><summary>{summary}</summary>\n\n```{fence}\n{text.rstrip()}\n```\n\n</details>"


# ---------------------------------------------------------------- sections


def intro(src: Sources) -> str:
    cfg, run = src.config, src.summary
    what = ("a reward model (a scalar head on the base)" if src.spec.inputs == "scores" else
            "a LoRA adapter" if src.adapter is not None else "a full fine-tune")
    why = {"kl_budget": "the KL budget", "max_seconds": "its wall-clock budget (max_seconds)", "guard": "a guard rule"}
    stop = f", stopped by {why.get(run['stopped'], run['stopped'])}" if run.get("stopped") not in (None, "max_steps") \
        else ""
    return (f"# {src.run.name}\n\n{src.spec.name.upper()} ({src.spec.paper or 'supervised fine-tuning'}) on "
            f"`{cfg.get('model')}`, trained with prefalign: {what}, {run.get('steps')} steps{stop}.")


def method(src: Sources) -> str:
    spec, cfg = src.spec, src.config
    doc = " ".join((spec.config.__doc__ or "").split())
    base = hub_id(str(cfg.get("model", "")))
    lines = ["## Method", "",
             f"**{spec.name}**: {doc}", "",
             f"- base model: `{cfg.get('model')}`" + (f" (Hub: `{base}`)" if base else " (a local folder)"),
             f"- trainer: {spec.trainer}; data: {spec.unit}; reference: {src.summary.get('reference') or 'none'}; "
             f"KL to the reference: {spec.kl}"]
    if (adapter := src.adapter) is not None:
        modules = adapter.get("target_modules")
        modules = ", ".join(sorted(modules)) if isinstance(modules, list) else modules
        lines.append(f"- LoRA adapter (final/adapter_config.json): r {adapter.get('r')}, alpha "
                     f"{adapter.get('lora_alpha')}, dropout {adapter.get('lora_dropout')}, on {modules}; its base: "
                     f"`{adapter.get('base_model_name_or_path')}`")
    fields = spec.config.model_fields
    keys = own_keys(spec.config) + [k for k in TRAINING_KEYS if k in cfg and k not in own_keys(spec.config)]
    rows = [[f"`{k}`", value(cfg[k]), fields[k].description if k in fields else ""] for k in keys if k in cfg]
    lines += ["", "### Hyperparameters", "", table(["key", "value", "meaning"], rows), "",
              details("every setting of the run (its resolved config.yaml)", "yaml",
                      yaml.safe_dump(cfg, sort_keys=False))]
    return "\n".join(lines)


def data(src: Sources) -> str:
    files = src.stats.get("files") or []
    tokens = any(k.endswith("_tokens") for f in files for k in f.get("stats", {}))
    lines = ["## Training data", "", "`prefalign data stats` of each file the run read, measured when this card "
             "was first written" + (f" (token lengths under `{src.stats['tokenizer']}`'s tokenizer)"
                                   if tokens else "") + "."]
    if not files:
        lines += ["", "No data file is named in the config."]
    counts, lengths, problems = [], [], []
    keys = [k for k in COUNTS if any(k in f.get("stats", {}) for f in files)]
    for f in files:
        name = f"`{f['path']}` ({f['role']})"
        if "error" in f:
            problems.append(f"- {name}: not read: {f['error']}")
            continue
        stats = f["stats"]
        counts.append([name] + [num(stats.get(k)) for k in keys])
        lengths += [[name, k] + [num(v.get(q)) for q in ("mean", "p50", "p90", "p99", "max")]
                    for k, v in stats.items() if isinstance(v, dict) and "p50" in v]
        if stats.get("problems"):
            problems.append(f"- {name}: bad records by kind: " + ", ".join(f"{k} {n}" for k, n in
                                                                            stats["problems"].items()))
    if counts:
        lines += ["", table(["file"] + keys, counts)]
    if lengths:
        lines += ["", table(["file", "length", "mean", "p50", "p90", "p99", "max"], lengths)]
    lines += [""] + problems if problems else []
    mixed = any(isinstance(src.config.get(k), list) for k in ("data", "prompts"))  # one plain file: the table above
    if mixed and (sources := src.summary.get("data_sources")):
        keys = list(dict.fromkeys(k for s in sources for k in s))
        lines += ["", "Mixture (run.json `data_sources`):", "", table(keys, [[num(s.get(k)) for k in keys]
                                                                            for s in sources])]
    return "\n".join(lines)


def evaluation(src: Sources) -> str:
    ev = src.evaluation
    if ev is None:
        note = f"{src.eval_note}\n\n" if src.eval_note else ""
        return (f"## Evaluation\n\n{note}Not evaluated yet: "
                f"`prefalign eval --model {src.final} --data HELD_OUT_PAIRS --judge JUDGE -o {src.run / 'eval'}`, "
                f"then `prefalign card {src.run}`.")
    reference = f"against the reference `{ev['reference']}`" if ev.get("reference") else "with no reference"
    lines = ["## Evaluation", "", f"`prefalign eval` of `{ev.get('model')}` {reference} "
             f"({src.eval_dir / 'eval.json'}); intervals are 95% bootstraps over prompts (pairs).", "",
             table(["metric", "value", "95% interval", "of"], eval_rows(ev)),
             *retention(ev), *missing(ev)]
    config = src.eval_dir / "eval_config.yaml"
    if config.exists():
        lines += ["", details(f"how it was evaluated: `prefalign eval {config}`", "yaml", config.read_text())]
    return "\n".join(lines)


def eval_rows(ev: dict[str, Any]) -> list[list[str]]:
    rows = []
    if "preference_accuracy" in ev:
        rows.append(["preference accuracy", num(ev["preference_accuracy"]), num(ev.get("preference_accuracy_ci95")),
                     f"{ev.get('preference_pairs')} held-out pairs, ranked by {ev.get('preference_kind')}"])
        rows.append(["preference margin", num(ev.get("preference_margin")), "", ev.get("preference_kind")])
    if "reward_mean" in ev:
        rows.append(["reward (mean ± std)", f"{num(ev['reward_mean'])} ± {num(ev.get('reward_std'))}",
                     num(ev.get("reward_ci95")), f"{ev.get('prompts')} prompts, judge: {ev.get('judge')}"])
    if "win_rate" in ev:
        agree = f"; both orders agreed on {num(ev['judge_order_agreement'])}" if "judge_order_agreement" in ev else ""
        rows.append(["win-rate", num(ev["win_rate"]), num(ev.get("win_rate_ci95")),
                     f"against `{ev.get('win_rate_baseline')}`{agree}"])
    for key, name in (("kl_per_sequence", "KL(π‖π_ref) per sequence"), ("kl_per_token", "KL(π‖π_ref) per token")):
        if key in ev:
            rows.append([name, num(ev[key]), "", f"exact, of {ev.get('kl_distribution')}"])
    if "perplexity" in ev:
        rows.append(["perplexity", num(ev["perplexity"]), "", f"{ev.get('perplexity_tokens')} held-out tokens; "
                     f"the reference: {num(ev.get('perplexity_reference'))}"])
    rows += [[k.replace("_", " "), num(ev[k]), "", "of the samples"] for k in ("entropy", "distinct_1", "distinct_2",
                                                                               "mean_length") if k in ev]
    return rows


def retention(ev: dict[str, Any]) -> list[str]:
    # suites/<name>/<metric>: a name may hold a slash (suites/lm-eval/gsm8k/score)
    suites = sorted({k.removeprefix("suites/").rsplit("/", 1)[0] for k in ev if k.startswith("suites/")})
    if not suites:
        return []
    cols = ["score", "score_reference", "refusal_rate", "refusal_rate_reference", "over_refusal_rate",
            "over_refusal_rate_reference", "n"]
    cols = [c for c in cols if any(f"suites/{s}/{c}" in ev for s in suites)]
    rows = [[s] + [num(ev.get(f"suites/{s}/{c}")) for c in cols] for s in suites]
    return ["", "Retention suites (greedy answers; `_reference`: the reference's):", "", table(["suite"] + cols, rows)]


def missing(ev: dict[str, Any]) -> list[str]:
    if ev.get("preference_kind") == "score":  # a reward model is evaluated on held-out pairs only
        return []
    gaps = [(key, why) for key, why in (
        ("preference_accuracy", "preference accuracy: give `--data` held-out pairs"),
        ("reward_mean", "reward: give `--judge`"),
        ("win_rate", "win-rate: give `--judge` (and a reference or `--baseline`)"),
        ("kl_per_sequence", "exact KL: needs a reference (and no top-k/top-p sampling)"),
        ("perplexity", "retention as perplexity: give `--text` or `--data`"),
    ) if key not in ev]
    if not any(k.startswith("suites/") for k in ev):
        gaps.append(("suites", "retention suites: give `--suite arithmetic --suite safety`"))
    return ["", "Not measured in this evaluation: " + "; ".join(why for _, why in gaps) + "."] if gaps else []


def training_metrics(src: Sources) -> str:
    last = src.summary.get("final") or {}
    if not last:
        return ""
    rows = [[f"`{k}`", num(v)] for k, v in last.items()]
    which = "The last logged step" if "last" not in src.summary else \
        f"Step {last.get('step')}, the checkpoint the guardrails chose for final/ (not the last step)"
    return (f"## During training\n\n{which} (run.json `final`; on the training batches, `eval/` on "
            "`eval_data`):\n\n" + table(["metric", "value"], rows))


def cost(src: Sources) -> str:
    run = src.summary
    peak = run.get("peak_memory_bytes")
    rows = [["hardware", run.get("device") or "not recorded (a run older than run.json's `device`)"],
            ["processes", num(run.get("processes"))],
            ["wall time of the training loop", f"{num(run.get('wall_seconds'))} s"],
            ["steps", f"{num(run.get('steps'))} ({run.get('stopped')}; {num(run.get('skipped_steps'))} skipped)"],
            ["tokens", f"{num(run.get('tokens'))} ({num(run.get('tokens_per_s'))} tokens/s)"],
            ["peak memory", f"{num(peak / 2**30)} GiB (GPU: allocator peak; CPU: peak RSS)" if peak else "–"],
            ["model copies in memory", num(run.get("model_copies"))]]
    return "## Cost\n\nFrom run.json (every key defined in prefalign's docs/metrics.md):\n\n" + table(["", ""], rows)


def reproduce(src: Sources) -> str:
    run = src.summary
    lines = ["## Reproduce", ""]
    if run.get("command"):
        lines += ["The command that ran it:", "", "```bash", run["command"], "```", ""]
    lines += ["From this card alone: save the config above (under Hyperparameters) as `config.yaml`, with the data "
              "files it names in place, and run", "", "```bash", "prefalign train config.yaml", "```"]
    if versions := run.get("versions"):
        lines += ["", "Trained with " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    return "\n".join(lines)


def usage(src: Sources) -> str:
    if src.spec.inputs == "scores":
        code = ("from transformers import AutoModelForSequenceClassification\n"
                "model = AutoModelForSequenceClassification.from_pretrained(\"PATH\")  # one score per sequence")
    elif src.adapter is not None:
        code = ("from peft import AutoPeftModelForCausalLM\n"
                "model = AutoPeftModelForCausalLM.from_pretrained(\"PATH\")  # loads the base adapter_config.json "
                "names\n# or: prefalign export PATH -o merged/ (one plain HF folder)")
    else:
        code = "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(\"PATH\")"
    return f"## Usage\n\n`PATH`: this folder (or its Hub repository).\n\n```python\n{code}\n```"


def citation(src: Sources) -> str:
    entries = citations(src.config)
    if not entries:
        return "## Citation\n\nSupervised fine-tuning: no method paper to cite."
    return "## Citation\n\n```bibtex\n" + "\n\n".join(entries) + "\n```"
