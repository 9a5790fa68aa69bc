"""Determinism: seeding and dropout off, so that policy and reference agree at step 0 and runs repeat."""

from __future__ import annotations

import torch


def disable_dropout(model) -> None:
    # As the DPO reference implementation does: dropout would make policy and reference log-probs
    # of the same sequence differ at step 0 and add noise to the implicit reward.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
