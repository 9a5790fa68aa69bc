"""`prefalign label`: sampled completions -> a preference file (or best-of-n SFT data) by a judge.

Pointwise judges (a reward model, a Python callable) score every completion; the pairwise LLM judge
plays a round robin among a prompt's completions, both orders per pair, and a completion's score is
its mean probability of winning. Then per prompt:
  best_vs_worst  one pair, best against worst (RSO-style: the pair the judge is surest of)
  best_vs_rest   best against each other completion
  all            every pair in score order
  best           best-of-n: the best completion alone, as SFT data ({"prompt", "completion"})
A pair's `margin` is the judge's score difference (for the pairwise judge: the logit of the
both-orders probability that the chosen beats the rejected). Equal scores give no pair.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ..config import Remote
from ..data.noise import order_inconsistency
from ..data.readers import read_rows
from ..data.records import Problem
from ..judges import make_judge
from ..judges.remote import RemotePairwiseJudge
from ..runtime.device import pick_device


class LabelConfig(Remote):
    """`prefalign label`: sampled completions -> preference pairs (or best-of-n SFT data) by a judge."""

    samples: str = Field(..., description="`prefalign sample` output")
    judge: str = Field(..., description="MODULE:FUNCTION, FILE.py:FUNCTION, a reward-model folder, or a causal-LM "
                                        "folder (pairwise judge); with generation_backend: openai, the name the "
                                        "server knows the pairwise judge model by")
    generation_backend: Literal["hf", "openai"] = Field(
        "hf", description="hf: the judge runs in this process; openai: the pairwise LM judge runs on the "
                          "OpenAI-compatible server at base_url (log-probs of the two letters)")
    output: str = Field(..., description="preference file (or SFT file with mode: best)")
    mode: Literal["best_vs_worst", "best_vs_rest", "all", "best"] = Field(
        "best_vs_worst", description="pairs made per prompt, or best: the best completion as SFT data")
    skip_unfinished: bool = Field(False, description="drop completions that never reached EOS")
    device: str = Field("auto", description="where a model judge runs (runtime/device.py picks for auto)")


def _read_samples(path: str) -> tuple[list[dict], list[Problem]]:
    items, problems = [], []
    for row in read_rows(path):
        if isinstance(row, Problem):
            problems.append(row)
            continue
        v = row.value
        if not isinstance(v, dict) or "prompt" not in v or not isinstance(v.get("completions"), list):
            problems.append(
                Problem(row.where, "completions", "expected {prompt, completions: [...]}", "shape", row.raw)
            )
            continue
        items.append(v)
    return items, problems


def _answer(prompt, text: str):
    """A completion in the prompt's own shape: text, or an assistant message after a message prompt."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def label(cfg: LabelConfig, log=print, judge=None) -> dict:
    if judge is None and cfg.generation_backend == "openai":
        judge = RemotePairwiseJudge(cfg.judge, cfg.base_url, cfg.api_key_env)
    judge = judge or make_judge(cfg.judge, pick_device(cfg.device), pairwise_ok=True)
    items, problems = _read_samples(cfg.samples)
    written, ties, agree, compared = 0, 0, 0, 0
    gaps: list[float] = []
    all_scores: list[float] = []
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for item in items:
            prompt = item["prompt"]
            ended = item.get("ended") or [True] * len(item["completions"])
            texts = [c for c, e in zip(item["completions"], ended, strict=False)
                     if isinstance(c, str) and c.strip() and (e or not cfg.skip_unfinished)]
            texts = list(dict.fromkeys(texts))  # identical samples are one answer
            if len(texts) < (1 if cfg.mode == "best" else 2):
                ties += 1
                continue
            if judge.kind == "pairwise":  # in process or on a server
                scores, win, agreement = _round_robin(judge, prompt, texts)
                agree += int(agreement.sum())
                compared += agreement.numel()
            else:
                scores = judge.score([prompt] * len(texts), texts)
                win = None
            all_scores += scores if win is None else []
            order = sorted(range(len(texts)), key=lambda i: -scores[i])
            if cfg.mode == "best":
                f.write(json.dumps({"prompt": prompt, "completion": _answer(prompt, texts[order[0]]),
                                    "score": scores[order[0]]}, ensure_ascii=False) + "\n")
                written += 1
                continue
            pairs = {"best_vs_worst": [(order[0], order[-1])], "best_vs_rest": [(order[0], j) for j in order[1:]],
                     "all": list(itertools.combinations(order, 2))}[cfg.mode]
            for a, b in pairs:
                if scores[a] == scores[b]:
                    ties += 1
                    continue
                margin = _logit(win[a][b]) if win is not None else scores[a] - scores[b]
                gaps.append(scores[a] - scores[b])
                f.write(json.dumps({"prompt": prompt, "chosen": _answer(prompt, texts[a]),
                                    "rejected": _answer(prompt, texts[b]), "margin": margin}, ensure_ascii=False)
                        + "\n")
                written += 1
    summary = {"prompts": len(items), "written": written, "ties_or_too_few": ties, "problems": len(problems),
               "judge": judge.kind, "mean_score": sum(all_scores) / len(all_scores) if all_scores else None,
               "mean_score_gap": sum(gaps) / len(gaps) if gaps else None,
               "agreement_rate": agree / compared if compared else None,
               # the judge's A/B vs B/A disagreement: a diagnostic, not the written labels' flip rate (docs/noise.md)
               "order_inconsistency": order_inconsistency(compared - agree, compared).to_json()
               if compared else None}
    log(f"{written} {'SFT examples' if cfg.mode == 'best' else 'pairs'} -> {out}; {ties} prompts/pairs without a "
        f"preference" + (f"; judge order agreement {summary['agreement_rate']:.2f}" if compared else ""))
    return summary


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def _round_robin(judge, prompt, texts: list[str]):
    """Every pair once, in both orders: (mean win probability per completion, P(i beats j), agreement)."""
    n = len(texts)
    pairs = list(itertools.combinations(range(n), 2))
    p, agreement = judge.compare([prompt] * len(pairs), [texts[i] for i, _ in pairs], [texts[j] for _, j in pairs])
    win = [[0.5] * n for _ in range(n)]
    for (i, j), pij in zip(pairs, p.tolist(), strict=True):
        win[i][j], win[j][i] = pij, 1 - pij
    scores = [sum(win[i][j] for j in range(n) if j != i) / (n - 1) for i in range(n)]
    return scores, win, torch.as_tensor(agreement)
