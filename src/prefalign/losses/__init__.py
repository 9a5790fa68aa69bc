"""Pure loss functions over tensors: no model, no I/O."""

from .preference import METHODS, Method

__all__ = ["METHODS", "Method"]
