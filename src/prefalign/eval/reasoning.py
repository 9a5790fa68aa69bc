"""The reasoning suite's problems and final-answer rule: judges/reasoning.py (scored by eval and train)."""

from ..judges.reasoning import apply, final_number, is_right, items, problem

__all__ = ["apply", "final_number", "is_right", "items", "problem"]
