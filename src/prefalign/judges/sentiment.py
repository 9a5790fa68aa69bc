"""The ground-truth scorer of the sentiment task: VADER (Hutto and Gilbert 2014, vaderSentiment, MIT),
a rule- and lexicon-based analyser that runs offline. `positive` is a judge callable:
`--reward prefalign.judges.sentiment:positive`. Measured on 2,000 IMDb test reviews it agrees with
the human label 70.6% of the time (61.6% on 20-word prefixes; ../shared/README.md)."""

from __future__ import annotations

from functools import lru_cache

from ..errors import ScorerMissing


@lru_cache(maxsize=1)
def analyser():
    try:  # an optional extra (`prefalign[demo]`): only the sentiment task needs it
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ScorerMissing("the sentiment scorer needs vaderSentiment: pip install 'prefalign[demo]'") from None
    return SentimentIntensityAnalyzer()


def compound(text: str) -> float:
    """VADER's normalised compound score in [-1, 1]: > 0.05 positive, < -0.05 negative by its authors' rule."""
    return analyser().polarity_scores(text)["compound"]


def positive(prompts: list[str], completions: list[str]) -> list[float]:
    """The reward: the compound sentiment of the continuation alone (the prefix is not the model's)."""
    return [compound(c) for c in completions]
