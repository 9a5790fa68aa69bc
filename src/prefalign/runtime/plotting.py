"""Headless plotting: one way to get matplotlib's pyplot for the report, the study and the bench."""

from __future__ import annotations


def pyplot():
    """pyplot on the Agg backend (no display needed)."""
    # imported here, not at module top: the backend must be chosen before pyplot loads, and only the
    # commands that draw should pay matplotlib's import time
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
