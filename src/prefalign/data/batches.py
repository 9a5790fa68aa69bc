"""Tokenized examples and padded batches. Sequences are truncated first, then padded to the longest
in the batch (never to a global maximum: padding every batch to max_length wastes memory and time)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DataError
from .records import PreferencePair, Problem, Record, UnpairedExample
from .tokenize import TokenizationError, Tokenized, tokenize


@dataclass
class Example:
    """One training unit: a pair (chosen, rejected) or an unpaired completion (+ label, + the
    mismatched completion KTO uses for its KL reference point)."""

    seqs: tuple[Tokenized, ...]
    label: bool | None = None
    margin: float | None = None  # a pair's known score difference (ranked data, a judge)


@dataclass
class TokenizedData:
    examples: list[Example]
    problems: list[Problem]
    truncated: int

    def __len__(self) -> int:
        return len(self.examples)


def tokenize_records(tokenizer, records: list[Record], *, max_length: int, max_prompt_length: int,
                     unit: str = "pairs", assistant_turns: str = "last") -> TokenizedData:
    """Examples for a method whose data unit is `unit` (train/methods.py `Method.unit`): "pairs",
    "unpaired" (KTO) or "completions" (SFT: demonstrations, the chosen answer of a pair, or the
    desirable completions of labelled data; undesirable ones are skipped). Completions of conversations
    train the last assistant turn, or with assistant_turns "all" every assistant turn."""
    examples, problems, truncated = [], [], 0
    kw = dict(max_length=max_length, max_prompt_length=max_prompt_length)
    sft_kw = dict(kw, all_turns=assistant_turns == "all")
    want = (
        UnpairedExample
        if unit == "unpaired"
        else PreferencePair
        if unit == "pairs"
        else (PreferencePair, UnpairedExample)
    )
    wrong = [r for r in records if not isinstance(r, want)]
    if wrong:
        kind = "preference pairs" if unit == "pairs" else "unpaired examples (prompt, completion, label)"
        raise DataError(f"{wrong[0].where}: this method trains on {kind}, got a {wrong[0].kind} record")
    for i, r in enumerate(records):
        try:
            label, margin = None, None
            if unit == "pairs":
                seqs = (tokenize(tokenizer, r.prompt, r.chosen, **kw), tokenize(tokenizer, r.prompt, r.rejected, **kw))
                margin = r.margin
            elif unit == "unpaired":
                # KTO's KL reference point: this prompt with the next example's completion (mismatched)
                other = records[(i + 1) % len(records)]
                seqs = (tokenize(tokenizer, r.prompt, r.completion, **kw),
                        tokenize(tokenizer, r.prompt, other.completion, **kw))
                label = r.label
            elif isinstance(r, PreferencePair):
                seqs = (tokenize(tokenizer, r.prompt, r.chosen, **sft_kw),)
            elif r.label:
                seqs = (tokenize(tokenizer, r.prompt, r.completion, **sft_kw),)
            else:
                continue
        except TokenizationError as e:
            problems.append(Problem(r.where, "", str(e), "tokenize", raw=r.to_json()))  # the record, not lost
            continue
        truncated += any(s.truncated for s in seqs)
        examples.append(Example(seqs, label, margin))
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
        loss[i, :n] = torch.tensor(s.loss_mask)
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
    if any(e.margin is not None for e in examples):
        batch["margins"] = torch.tensor([e.margin or 0.0 for e in examples], dtype=torch.float32)
    return batch


def collate_shared_prompt(examples: list[Example], indices: list[int], pad_id: int) -> dict[str, Tensor]:
    """One row per pair, [prompt | chosen answer | rejected answer], so the prompt is computed once.

    The rejected answer attends to the prompt and to itself, never to the chosen answer, and its
    position ids restart where the prompt ends: every token sees exactly the context it has in its
    own sequence, so the log-probs equal the padded layout's (tested), for ~(2P+C+R)/(P+C+R) fewer
    tokens through the model. Who sees whom travels as two (B, T) vectors, `segment_ids` (the pair,
    -1 on padding) and `branch_ids` (0 prompt, 1 chosen, 2 rejected), read by `attends`; the model
    side builds from them the mask its attention takes (models/attention.py). Only for models with
    attention; state-space models use `collate_prompt_once`.
    """
    rows = []
    for e in examples:
        c, r = e.seqs
        rows.append((c, r, _shared_len(c, r)))
    longest = max(len(c.input_ids) + len(r.input_ids) - p for c, r, p in rows)
    b = len(rows)
    ids = torch.full((b, longest), pad_id, dtype=torch.long)
    pos = torch.zeros((b, longest), dtype=torch.long)
    seg = torch.full((b, longest), -1, dtype=torch.long)  # the pair that owns each column, -1 padding
    branch = torch.zeros((b, longest), dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected
    pred_rows, pred_cols, labels, seq_ids = [], [], [], []
    for i, (c, r, p) in enumerate(rows):
        nc, nr = len(c.input_ids) - p, len(r.input_ids) - p
        ids[i, :p + nc] = torch.tensor(c.input_ids)
        ids[i, p + nc:p + nc + nr] = torch.tensor(r.input_ids[p:])
        pos[i, :p + nc] = torch.arange(p + nc)
        pos[i, p + nc:p + nc + nr] = torch.arange(p, p + nr)
        seg[i, :p + nc + nr] = i
        branch[i, p:p + nc], branch[i, p + nc:p + nc + nr] = 1, 2
        for t in c.scored:  # chosen token t is predicted at row t - 1
            pred_rows.append(i), pred_cols.append(t - 1), labels.append(c.input_ids[t]), seq_ids.append(i)
        for t in r.scored:  # rejected index t sits at row t (+ nc past the prompt)
            col = t - 1 if t - 1 < p else t - 1 + nc
            pred_rows.append(i), pred_cols.append(col), labels.append(r.input_ids[t]), seq_ids.append(b + i)
    lengths = torch.tensor([c.completion_len for c, _, _ in rows] + [r.completion_len for _, r, _ in rows],
                           dtype=torch.float32)
    return {"input_ids": ids, "position_ids": pos, "segment_ids": seg, "branch_ids": branch,
            "pred_rows": torch.tensor(pred_rows),
            "pred_cols": torch.tensor(pred_cols), "labels_flat": torch.tensor(labels), "seq_ids": torch.tensor(seq_ids),
            "index": torch.tensor(indices), "lengths": lengths,
            # what the padded layout would have processed: the throughput every trainer reports
            "tokens": torch.tensor(sum(len(c.input_ids) + len(r.input_ids) for c, r, _ in rows))}


def _shared_len(c: Tokenized, r: Tokenized) -> int:
    """How many leading prompt tokens the chosen and rejected sequences have in common."""
    limit, shared = min(c.prompt_len, r.prompt_len), 0
    while shared < limit and c.input_ids[shared] == r.input_ids[shared]:
        shared += 1
    return shared


def collate_prompt_once(examples: list[Example], indices: list[int], pad_id: int) -> dict[str, Tensor]:
    """Prompt-once rows, for state-space models (models/prompt_once.py): each pair's shared prompt as
    one row of `prompt_ids` (B, P), computed once, and chosen then rejected as `input_ids` (2B, C)
    rows that continue from its recurrent state (slot-major, as `collate` orders them).

    The prompt rows are LEFT-padded, so that every row's state at the last column is its state at its
    own last prompt token (pads leave the state exactly zero: models/prompt_once.py says why). The
    prompt pass stops one token short of the prompt: its last token is each continuation's first
    column, whose hidden state predicts the first answer token, so every scored token is read from
    the continuation. `loss_mask` marks the scored tokens in continuation columns."""
    b, cuts = len(examples), []
    for e in examples:
        c, r = e.seqs
        first = min([*c.scored, *r.scored, len(c.input_ids), len(r.input_ids)])  # the first scored token
        cuts.append(max(0, min(_shared_len(c, r), first) - 1))
    width = max(cuts)
    prompt_ids = torch.full((b, width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((b, width), dtype=torch.long)
    for i, (e, n) in enumerate(zip(examples, cuts, strict=True)):
        prompt_ids[i, width - n:] = torch.tensor(e.seqs[0].input_ids[:n], dtype=torch.long)
        prompt_mask[i, width - n:] = 1
    rest = [Tokenized(s.input_ids[n:], 0, mask=s.loss_mask[n:]) for k in range(2)
            for s, n in zip((e.seqs[k] for e in examples), cuts, strict=True)]
    batch = pad(rest, pad_id)  # (2B, C) continuations, right-padded
    batch.update(prompt_ids=prompt_ids, prompt_mask=prompt_mask, index=torch.tensor(indices),
                 lengths=batch["loss_mask"].sum(-1).float(),
                 # what the padded layout would have processed: the throughput every trainer reports
                 tokens=torch.tensor(sum(len(s.input_ids) for e in examples for s in e.seqs)))
    if any(e.margin is not None for e in examples):
        batch["margins"] = torch.tensor([e.margin or 0.0 for e in examples], dtype=torch.float32)
    return batch


def collate_packed(examples: list[Example], indices: list[int], pad_id: int) -> dict[str, Tensor]:
    """Padding-free batching: every sequence of the batch (slot-major, as `collate` orders them) laid
    end to end in rows of at most the longest sequence's length (first fit, longest first), each
    with position ids restarting at 0 and its own `segment_ids` (block-diagonal causal attention by
    `attends`; `branch_ids` are all 0). A token sees exactly its own sequence, so log-probs equal the
    padded layout's (tested); only the tail of each row is padding. The output is the row layout
    `batch_logps` reads (pred_rows/pred_cols/...). Attention models only (Mamba has no mask)."""
    slots = len(examples[0].seqs)
    seqs = [e.seqs[k] for k in range(slots) for e in examples]
    width = max(len(s.input_ids) for s in seqs)
    rows: list[list[int]] = []  # sequence numbers per row
    room: list[int] = []
    for n in sorted(range(len(seqs)), key=lambda i: -len(seqs[i].input_ids)):
        size = len(seqs[n].input_ids)
        fit = next((r for r, left in enumerate(room) if left >= size), None)
        if fit is None:
            rows.append([]), room.append(width)
            fit = len(rows) - 1
        rows[fit].append(n)
        room[fit] -= size
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)  # which sequence owns each column
    pred_rows, pred_cols, labels, seq_ids = [], [], [], []
    for r, members in enumerate(rows):
        start = 0
        for n in members:
            s = seqs[n]
            end = start + len(s.input_ids)
            ids[r, start:end] = torch.tensor(s.input_ids)
            pos[r, start:end] = torch.arange(len(s.input_ids))
            seg[r, start:end] = n
            for t in [t for t in s.scored if t > 0]:  # token t is predicted at column t - 1
                pred_rows.append(r), pred_cols.append(start + t - 1), labels.append(s.input_ids[t]), seq_ids.append(n)
            start = end
    lengths = torch.tensor([s.completion_len for s in seqs], dtype=torch.float32)
    batch = {
        "input_ids": ids,
        "position_ids": pos,
        "segment_ids": seg,
        "branch_ids": torch.zeros_like(seg),
        "pred_rows": torch.tensor(pred_rows),
        "pred_cols": torch.tensor(pred_cols),
        "labels_flat": torch.tensor(labels),
        "seq_ids": torch.tensor(seq_ids),
        "index": torch.tensor(indices),
        "lengths": lengths,
        "tokens": torch.tensor(sum(len(s.input_ids) for s in seqs)),
    }
    if examples[0].label is not None:
        batch["labels"] = torch.tensor([bool(e.label) for e in examples])
    if any(e.margin is not None for e in examples):
        batch["margins"] = torch.tensor([e.margin or 0.0 for e in examples], dtype=torch.float32)
    return batch


def attends(seg_q: Tensor, branch_q: Tensor, seg_k: Tensor, branch_k: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """The row layouts' one attention rule, True where query q may see key k: an earlier (or the same)
    token of its own segment that is on its branch or on the shared trunk (branch 0), and every
    token sees itself (padding too: a softmax over nothing would be NaN). Written once, for both the
    dense mask below and FlexAttention's mask_mod (models/attention.py), so the two cannot drift."""
    visible = (seg_q == seg_k) & (seg_k >= 0) & ((branch_k == 0) | (branch_k == branch_q))
    return (visible & (k <= q)) | (q == k)


def dense_row_mask(segment_ids: Tensor, branch_ids: Tensor) -> Tensor:
    """(B, T) segment and branch ids -> the (B, 1, T, T) bool mask (True = attend) that sdpa and eager
    attention take. O(T^2): built only for those implementations, on the batch's device."""
    cols = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    q, k = (segment_ids[:, :, None], branch_ids[:, :, None]), (segment_ids[:, None, :], branch_ids[:, None, :])
    return attends(*q, *k, cols[:, None], cols[None, :])[:, None]
