"""The refusal rule set: judges/refusal.py (scored by eval and train)."""

from ..judges.refusal import first_sentence, is_refusal, normalise

__all__ = ["first_sentence", "is_refusal", "normalise"]
