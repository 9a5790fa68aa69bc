"""Ground-truth rewards for the benchmarks: plain callables f(prompts, completions) -> list[float]."""

from functools import lru_cache


@lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise SystemExit("the sentiment reward needs vaderSentiment: pip install vaderSentiment") from None
    return SentimentIntensityAnalyzer()


def vader_positive(prompts, completions):
    """VADER's compound sentiment of the continuation alone, in [-1, 1] (Hutto and Gilbert 2014)."""
    analyser = _vader()
    return [analyser.polarity_scores(c)["compound"] for c in completions]
