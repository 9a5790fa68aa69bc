"""Ground-truth rewards for the benchmarks: plain callables f(prompts, completions) -> list[float]."""

from prefalign.judges.sentiment import positive


def vader_positive(prompts, completions):
    """VADER's compound sentiment of the continuation alone, in [-1, 1] (prefalign.judges.sentiment)."""
    return positive(prompts, completions)
