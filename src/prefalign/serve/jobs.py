"""A request as the engine sees it: its rows, its own random generator, its stop rules and its output.

Per-request randomness: every request owns a `torch.Generator` seeded from its `seed` (or a fresh
random seed), and its rows are drawn with it alone, so what else shares the batch cannot change the
draw. The draw itself is transformers' `generate` (do_sample): the logits go through the same
warpers in the same order (temperature, top-k, top-p), then `torch.multinomial(probs, 1)`, which
torch computes as argmax(probs / q) with q ~ Exp(1) drawn for the whole (rows, vocab) matrix. A
request draws q for all its rows at every step until its last row ends (generate keeps drawing for
finished rows as well), and uses the rows still running. A request of k rows with seed s therefore
consumes its generator exactly as `generate` consumes the global one after `torch.manual_seed(s)` on
those k rows: `prefalign sample` through `generation_backend: openai` and in process draw the same
completions (tests/test_remote_generation.py). What is not promised: bit-identical logits when the
request shares a batch (other rows change the matmul shapes, and the kernels may then round
differently); a flip needs two tokens within float rounding of argmax(p/q), and greedy a near-tie.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


@dataclass
class Settings:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's and the top k's
    ignore_eos: bool = False
    echo: bool = False


@dataclass
class Row:
    """One completion: the prompt it continues and what has been generated so far."""

    index: int  # choice index in the response
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)  # generated ids, EOS excluded
    generated: int = 0  # tokens generated, an EOS that ended it included (usage counts it)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    text: str = ""  # the decoded completion, cut at a stop string
    sent: int = 0  # characters of `text` already sent to the client
    finish: str | None = None  # "stop" | "length" | None while running
    prompt_logprobs: list | None = None  # echo: [(token, logprob or None, top)] per prompt token


class Job:
    """A request's rows (prompt-major: prompt i's n completions are rows i*n .. i*n+n-1), its sampler,
    and `emit`, which hands events to the HTTP side (thread-safe)."""

    def __init__(self, model: str, prompts: list[list[int]], n: int, settings: Settings,
                 emit: Callable[[tuple], None]):
        self.model, self.settings, self.emit = model, settings, emit
        self.rows = [Row(i * n + j, list(p)) for i, p in enumerate(prompts) for j in range(n)]
        self.n_prompts = len(prompts)
        self.seed = settings.seed if settings.seed is not None else secrets.randbits(63)
        self.generator: torch.Generator | None = None  # made on the model's device when admitted
        self.cancelled = threading.Event()  # the client went away: the engine drops the rows
        greedy = settings.temperature <= 0
        self.greedy = greedy
        self.warpers = [] if greedy else [w for w in (
            TemperatureLogitsWarper(settings.temperature) if settings.temperature != 1.0 else None,
            TopKLogitsWarper(top_k=settings.top_k) if settings.top_k else None,
            TopPLogitsWarper(top_p=settings.top_p) if settings.top_p < 1.0 else None) if w is not None]

    def running(self) -> list[Row]:
        return [r for r in self.rows if r.finish is None]

    def start(self, device: torch.device) -> None:
        self.generator = torch.Generator(device=device).manual_seed(self.seed)

    def sample(self, logits: torch.Tensor, active: list[int]) -> torch.Tensor:
        """Next tokens of rows `active` (indices into self.rows) from their float32 logits (len(active), V)."""
        if self.greedy:
            return torch.argmax(logits, dim=-1)
        scores = logits
        for warp in self.warpers:
            scores = warp(None, scores)
        probs = torch.softmax(scores, dim=-1)
        # torch.multinomial(probs, 1) over all of the request's rows, as generate draws it (see above)
        q = torch.empty((len(self.rows), probs.shape[-1]), dtype=probs.dtype, device=probs.device)
        q.exponential_(1, generator=self.generator)
        return torch.argmax(probs / q[active], dim=-1)


def stop_cut(text: str, stops: list[str], start: int) -> int | None:
    """Where the earliest stop string begins in text[start:] (searching from a little before `start`,
    so that a stop string split across two tokens is found), or None."""
    width = max((len(s) for s in stops), default=0)
    hits = [i for s in stops if (i := text.find(s, max(0, start - width + 1))) >= 0]
    return min(hits) if hits else None


def sendable(text: str, stops: list[str]) -> int:
    """How much of a running completion's text may be streamed: not a tail that could still become
    a stop string, nor an incomplete UTF-8 character (decoded as U+FFFD)."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return max(end, 0)
