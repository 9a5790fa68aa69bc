"""Perplexity of held-out text: one code path for `prefalign eval`'s `perplexity` and the training guards'
`guard/perplexity`, so the two are the same measurement: the text read the same way, rows that do not
tokenize left out (and counted), exp(total NLL / tokens) over every token but each row's first (nothing
before it to predict it from)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from ..data.batches import pad
from ..data.tokenize import TokenizationError, Tokenized, tokenize
from ..errors import ConfigError
from .logps import sequence_logps


def text_pieces(path: str, setting: str = "text") -> list[tuple[str, str]]:
    """A text file's rows as (prompt, completion): {text} or {prompt, completion}, or a preference pair's
    {prompt, chosen} (held-out pairs' chosen answers). `setting` names the option in errors."""
    pieces = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{path}:{n}: not JSON: {e}") from None
        answer = next((k for k in ("completion", "chosen") if isinstance(row, dict) and k in row), None)
        if not isinstance(row, dict) or not ("text" in row or ("prompt" in row and answer)):
            raise ConfigError(f"{path}:{n}: expected an object with `text`, or `prompt` and `completion` (or `chosen`)")
        pieces.append(("", row["text"]) if "text" in row else (row["prompt"], row[answer]))
    if not pieces:
        raise ConfigError(f"{path}: {setting} has no rows")
    return pieces


def tokenize_pieces(tokenizer, pieces: list[tuple[str, str]], max_length: int,
                    max_prompt_length: int) -> tuple[list[Tokenized], int]:
    """(the rows tokenized, how many did not tokenize: no room for the completion within the lengths)."""
    seqs, skipped = [], 0
    for prompt, completion in pieces:
        try:
            seqs.append(tokenize(tokenizer, prompt, completion, max_length=max_length,
                                 max_prompt_length=max_prompt_length))
        except TokenizationError:
            skipped += 1
    return seqs, skipped


@torch.no_grad()
def total_nll(model, seqs: list[Tokenized], pad_id: int, device, *, batch_size: int, chunk_mb: float,
              autocast: Callable = nullcontext, advance: Callable[[int], None] | None = None) -> tuple[float, int]:
    """(the summed negative log-likelihood of `seqs`' loss tokens under `model`, how many tokens), in batches
    of `batch_size`; `advance` is told each batch's rows (a progress bar)."""
    nll, tokens = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        batch = {k: v.to(device) for k, v in pad(seqs[i:i + batch_size], pad_id).items()}
        mask = batch["loss_mask"].clone()
        mask[:, 0] = False  # the first token has no context to be predicted from
        tokens += int(mask.sum())
        with autocast():
            nll -= float(sequence_logps(model, batch["input_ids"], batch["attention_mask"], mask,
                                        chunk_mb=chunk_mb).sum())
        if advance is not None:
            advance(len(seqs[i:i + batch_size]))
    return nll, tokens


def perplexity(total: float, tokens: int) -> float:
    """exp(total NLL / tokens); NaN without a token."""
    return math.exp(total / tokens) if tokens else float("nan")
