"""Evaluation metrics as pure functions; each is defined once here and in docs/metrics.md.

- bootstrap_ci: the percentile bootstrap (Efron and Tibshirani 1993, §13.3) of a statistic of a sample.
- win_rate: wins count 1, ties 1/2, losses 0, averaged over prompts, with a bootstrap interval.
- the exact KL and entropy of next-token distributions are models/logps.py's (kl_from_logps).
- distinct_n: distinct n-grams / all n-grams over a set of completions (Li et al. 2016).
- perplexity: exp(total negative log-likelihood / total tokens): models/perplexity.py's (the training guards
  measure it with the same code).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def bootstrap_ci(values: Sequence[float], statistic: Callable[[Tensor], Tensor] = torch.mean, *,
                 resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval: resample the values with replacement `resamples` times,
    compute the statistic of each resample, return its (1-level)/2 and (1+level)/2 quantiles."""
    x = torch.as_tensor(list(values), dtype=torch.float64)
    if x.numel() == 0:
        return float("nan"), float("nan")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (resamples, x.numel()), generator=gen)
    stats = torch.stack([statistic(row) for row in x[idx]]) if statistic is not torch.mean else x[idx].mean(-1)
    lo, hi = torch.quantile(stats, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def outcomes(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-item outcome of a against b from two scores: 1 win, 0.5 tie, 0 loss."""
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)]


def win_rate(results: Sequence[float], **kw) -> tuple[float, tuple[float, float]]:
    """(mean outcome, bootstrap 95% interval) of outcomes in {0, 0.5, 1} (or soft, in [0, 1])."""
    return sum(results) / len(results), bootstrap_ci(results, **kw)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of whitespace tokens, pooled over the texts."""
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
