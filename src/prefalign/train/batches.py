"""Tokenized examples and padded batches. Sequences are truncated first, then padded to the longest
in the batch (never to a global maximum: padding to max_length is the peers' out-of-memory trap)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.records import PreferencePair, Problem, Record, UnpairedExample
from ..data.tokenize import TokenizationError, Tokenized, tokenize


@dataclass
class Example:
    """One training unit: a pair (chosen, rejected) or an unpaired completion (+ label, + the
    mismatched completion KTO uses for its KL reference point)."""

    seqs: tuple[Tokenized, ...]
    label: bool | None = None


@dataclass
class TokenizedData:
    examples: list[Example]
    problems: list[Problem]
    truncated: int

    def __len__(self) -> int:
        return len(self.examples)


def tokenize_records(tokenizer, records: list[Record], *, max_length: int, max_prompt_length: int,
                     paired: bool) -> TokenizedData:
    examples, problems, truncated = [], [], 0
    kw = dict(max_length=max_length, max_prompt_length=max_prompt_length)
    want = PreferencePair if paired else UnpairedExample
    wrong = [r for r in records if not isinstance(r, want)]
    if wrong:
        kind = "preference pairs" if paired else "unpaired examples (prompt, completion, label)"
        raise ValueError(f"{wrong[0].where}: this method trains on {kind}, got a {wrong[0].kind} record")
    for i, r in enumerate(records):
        try:
            if paired:
                seqs = (tokenize(tokenizer, r.prompt, r.chosen, **kw), tokenize(tokenizer, r.prompt, r.rejected, **kw))
                label = None
            else:
                # KTO's KL reference point: this prompt with the next example's completion (mismatched)
                other = records[(i + 1) % len(records)]
                seqs = (tokenize(tokenizer, r.prompt, r.completion, **kw),
                        tokenize(tokenizer, r.prompt, other.completion, **kw))
                label = r.label
        except TokenizationError as e:
            problems.append(Problem(r.where, "", str(e), "tokenize"))
            continue
        truncated += any(s.truncated for s in seqs)
        examples.append(Example(seqs, label))
    return TokenizedData(examples, problems, truncated)


def pad(seqs: list[Tokenized], pad_id: int) -> dict[str, Tensor]:
    """Right-padded (N, T) input_ids, attention_mask and loss_mask (completion tokens), T = longest."""
    longest = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), longest), dtype=torch.long)
    loss = torch.zeros((len(seqs), longest), dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attn[i, :n] = 1
        loss[i, s.prompt_len:n] = True
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def collate(examples: list[Example], indices: list[int], pad_id: int) -> dict[str, Tensor]:
    """All sequences of the batch in one padded block, grouped by slot: for pairs the rows are
    [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}], so chosen and rejected share one forward."""
    slots = len(examples[0].seqs)
    seqs = [e.seqs[k] for k in range(slots) for e in examples]
    batch = pad(seqs, pad_id)
    batch["index"] = torch.tensor(indices)
    batch["lengths"] = batch["loss_mask"].sum(-1).float()
    if examples[0].label is not None:
        batch["labels"] = torch.tensor([bool(e.label) for e in examples])
    return batch
