"""The audit's figures from its stages and test rows: what a training run held, each arm's end-to-end cost,
the mean and interval over seeds of every quality and cost figure, and the comparisons and verdict of
each DPO-family arm against each RLHF arm (tasks/audit_verdict.py writes the sentences). Keys: docs/audit.md."""

from __future__ import annotations

from typing import Any

from ..train.methods import METHODS
from .audit_verdict import compare, figures, verdict
from .seeds import mean_ci
from .stages import chain

DPO_FAMILY = ("dpo", "dpo_iterative")
LABEL = {"dpo": "DPO", "dpo_iterative": "iterative DPO", "ppo": "PPO", "rloo": "RLOO"}  # as the verdict names them
REWARD_KINDS = {"callable": "function", "reward_model": "model"}


def holds(run: dict) -> str:
    """What a training run held besides its policy, from its run.json: the reference (an adapter-disabled
    base under LoRA, a frozen copy, log-probabilities precomputed once, or none), PPO's critic, the reward."""
    kinds = {"adapter": "adapter-disabled base", "copy": "frozen copy", "precompute": "precomputed log-probs"}
    parts = [f"reference: {kinds.get(run.get('reference'), run.get('reference') or 'none')}"]
    method = METHODS.get(run.get("method") or "")
    if method is not None and "critic" in method.config.model_fields:  # counted only as a model of its own
        others = 1 + (run.get("reference") == "copy") + (run.get("reward") == "reward_model")
        parts.append("critic: value head" if run.get("model_copies") == others else "critic: separate model")
    if run.get("reward"):
        parts.append(f"reward: {REWARD_KINDS.get(run['reward'], run['reward'])}")
    return ", ".join(parts)


def quality(ev: dict) -> dict:
    keys = ("reward_mean", "reward_ci95", "win_rate", "win_rate_ci95", "kl_per_sequence", "kl_per_token",
            "perplexity", "perplexity_reference", "mean_length")
    q = {k: ev.get(k) for k in keys}
    q.update({k: v for k, v in ev.items() if k.startswith("suites/")})
    return q


def end_to_end(rows: list[dict | None]) -> dict:
    """Stages one after another (tasks/stages.py `chain`: times add up, the peak is the largest stage's);
    energy and money only when every stage has them; tokens summed; model copies (and what they are) of the
    training stage, the last."""
    rows = [r for r in rows if r]
    c = chain(*rows)
    total = {k: None if any(r[k] is None for r in rows) else sum(r[k] for r in rows) for k in ("usd", "energy_joules")}
    return {"seconds": c["seconds"], "device_hours": sum(r["device_hours"] for r in rows),
            "peak_memory_bytes": c["peak_cuda_bytes"] or c["peak_rss_bytes"], **total, "cpu_seconds": c["cpu_seconds"],
            **{k: sum(r[k] or 0 for r in rows) for k in ("tokens_sampled", "tokens_trained")},
            "model_copies": rows[-1]["model_copies"], "model_holds": rows[-1]["model_holds"],
            "stages": [r["stage"] for r in rows]}


def arm_summary(rows: list[dict]) -> dict:
    """Mean and 95% t-interval over seeds of each quality and cost figure of one arm's test rows."""
    out = {"setting": rows[0]["setting"], "seeds": [r["seed"] for r in rows]}
    for key in ("reward_mean", "win_rate", "kl_per_sequence", "perplexity", "seconds", "device_hours",
                "peak_memory_bytes", "usd", "energy_joules", "cpu_seconds", "tokens_sampled", "tokens_trained"):
        vals = [r.get(key) for r in rows]
        out[key], out[key + "_ci95"] = (None, None) if None in vals else mean_ci(vals)
    out["model_copies"], out["model_holds"] = rows[0]["model_copies"], rows[0]["model_holds"]
    return out


def summarise(cfg: Any, hw: dict, stages: list[dict], sweep: list, chosen: dict, test: list,
              base_test: list) -> dict:
    arms = {}
    for arm in cfg.arms:
        for kind in ("best", "matched"):
            rows = [r for r in test if r["arm"] == arm and r[kind]]
            if rows:
                arms.setdefault(arm, {})[kind] = arm_summary(rows)
    by_seed = lambda arm, kind: {r["seed"]: r for r in test if r["arm"] == arm and r[kind]}  # noqa: E731
    comparisons, sentences, figs = {}, [], {}
    pairs = [(a, b) for a in DPO_FAMILY if a in cfg.arms for b in cfg.arms if b not in DPO_FAMILY]
    for one, other in pairs:
        best = compare(by_seed(one, "best"), by_seed(other, "best"))
        m_a, m_b = by_seed(one, "matched"), by_seed(other, "matched")
        matched = compare(m_a, m_b) if m_a and m_b else None
        kls = {"a": arms[one]["matched"]["kl_per_sequence"], "b": arms[other]["matched"]["kl_per_sequence"]} \
            if matched else None
        f = figures(LABEL[one], LABEL[other], best, matched, chosen["matched_kl"], kls, len(cfg.seeds))
        comparisons[f"{one} vs {other}"] = {"best": best, "matched": matched}
        figs[f"{one} vs {other}"] = f
        sentences += verdict(f)
    base = {k: mean_ci([r[k] for r in base_test]) for k in ("reward_mean", "perplexity")}
    return {"audit": 1, "config": cfg.model_dump(mode="json"), "hardware": hw,
            "energy": _energy_status(stages), "stages": stages, "sweep": sweep, "chosen": chosen,
            "test": test, "base": {"rows": base_test, **{k: v[0] for k, v in base.items()},
                                   **{k + "_ci95": v[1] for k, v in base.items()}},
            "arms": arms, "comparisons": comparisons,
            "verdict": {"text": " ".join(sentences), "sentences": sentences, "figures": figs}}


def _energy_status(stages: list[dict]) -> dict:
    measured = [s for s in stages if s["energy_joules"] is not None]
    if len(measured) == len(stages):
        return {"measured": True, "status": "measured", "joules": sum(s["energy_joules"] for s in stages)}
    return {"measured": False, "status": next(s["energy"] for s in stages if s["energy_joules"] is None),
            "joules": None}
