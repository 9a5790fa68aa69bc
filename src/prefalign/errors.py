"""One error hierarchy. A `PrefalignError` is a problem prefalign explains in one line (the file, line or
key, and what to do); the CLI prints it and exits 2 for what was asked (config, data, model, judge) or
1 for a run that failed. Anything else is a bug and keeps its traceback.

Each class also derives from the builtin it replaces, so `except ValueError` callers keep working.
"""

from __future__ import annotations


class PrefalignError(Exception):
    exit_code = 1


class ConfigError(PrefalignError, ValueError):
    """A configuration or usage problem, worded for whoever wrote the YAML, the override or the flag."""

    exit_code = 2


class DataError(PrefalignError, ValueError):
    """Input data that cannot be used: names the file, line and field."""

    exit_code = 2


class ModelError(PrefalignError, ValueError):
    """A model folder that cannot be loaded safely or does not fit the method."""

    exit_code = 2


class JudgeError(ConfigError):
    """A reward or judge specification that does not resolve to something that scores."""


class ScoringError(PrefalignError, ValueError):
    """A judge that resolved but returned something unusable while a run was scoring: the run failed."""


class ScorerMissing(PrefalignError, ImportError):
    """An optional scorer's package is not installed."""

    exit_code = 2


class TrainingError(PrefalignError, RuntimeError):
    """A run that had to stop (non-finite steps, ...); its last checkpoint is kept."""


class OutOfMemoryError(TrainingError, MemoryError):
    """A run that ran out of host or GPU memory: says where (loading the model, the reference
    precompute, step N) and which settings need less. A MemoryError too, as what it replaces was one
    (or torch's OutOfMemoryError, a RuntimeError)."""


class StorageError(PrefalignError, OSError):
    """A write the disk could not take (full, over quota, over a file-size limit): names the file, the bytes it
    needed and those free. Nothing half-written is left where a good file would be read (prefalign/storage.py)."""
