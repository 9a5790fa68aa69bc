"""Task suites: judges/suites.py (moved below the eval and train layers, which both score them)."""

from ..judges.suites import SHIPPED, Suite, load_suite, score_one, score_suite, shipped_suites, suite_prompts

__all__ = ["SHIPPED", "Suite", "load_suite", "score_one", "score_suite", "shipped_suites", "suite_prompts"]
