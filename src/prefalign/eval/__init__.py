"""Evaluation: judges, metrics and suites."""
