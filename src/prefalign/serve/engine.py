"""The scheduler: one thread that batches every running request of a model and decodes them together.

Continuous batching at the step level: each served model has one running batch with one KV cache.
A request that arrives is prefilled alone (its rows left-padded among themselves, as `generate`
pads a batch), its first tokens drawn, and its rows merged into the running batch between two decode
steps: the cache tensors and the attention mask of the shorter side are padded on the left with
masked columns. Rows that finish leave at once (their cache rows are dropped, and columns that no
remaining row attends to are trimmed), so a long request does not hold short ones back and a new one
does not wait for the batch to drain. Several models take turns, one decode step each.

The merge needs a cache of plain key/value layers (transformers' DynamicLayer: Llama, Qwen, GPT-2,
...). For any other cache (sliding windows, Mamba states) a model's batch admits requests only when
it is empty, all that wait at once: batching at request boundaries (`Engine.mergeable`).

`max_batch` caps the rows decoded together (1: one request at a time, the benchmark's baseline): a
request joins the batch only when its rows fit, and the API refuses a request of more rows. An error
in one request's prefill (its seed, its prompt) answers that request alone; an error in a decode step
answers every request in the batch; no request is left without an answer.
`stats()` counts steps and the rows and requests in each: the evidence that requests were batched.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..models.generate import left_pad
from .jobs import Job, Row, stop_cut
from .models import Served


@dataclass
class Batch:
    """The running rows of one served model, in cache order."""

    rows: list[tuple[Job, Row]] = field(default_factory=list)
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None  # (B, T) 1 where a cache column is a real token of that row
    positions: torch.Tensor | None = None  # (B,) the position id of each row's next input token
    inputs: torch.Tensor | None = None  # (B,) each row's last sampled token, the next step's input


class Engine:
    def __init__(self, served: dict[str, Served], device: torch.device, max_batch: int = 32):
        self.served, self.device, self.max_batch = served, device, max_batch
        self.incoming: queue.Queue[Job] = queue.Queue()
        self.waiting: dict[str, list[Job]] = {name: [] for name in served}
        self.batches: dict[str, Batch] = {name: Batch() for name in served}
        self.mergeable = {name: _mergeable(s) for name, s in served.items()}
        self.counts = {"requests": 0, "steps": 0, "generated_tokens": 0, "prefills": 0}
        self.rows_per_step: Counter[int] = Counter()
        self.requests_per_step: Counter[int] = Counter()
        self.lock = threading.Lock()  # guards the counters, which the HTTP side reads
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="prefalign-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.incoming.put(None)  # type: ignore[arg-type]  # wakes the loop
        self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        self.incoming.put(job)

    def stats(self) -> dict:
        with self.lock:
            return {**self.counts, "rows_per_step": {str(k): v for k, v in sorted(self.rows_per_step.items())},
                    "requests_per_step": {str(k): v for k, v in sorted(self.requests_per_step.items())},
                    "max_rows_per_step": max(self.rows_per_step, default=0),
                    "max_requests_per_step": max(self.requests_per_step, default=0),
                    "running_rows": sum(len(b.rows) for b in self.batches.values()),
                    "waiting_requests": sum(len(w) for w in self.waiting.values()), "max_batch": self.max_batch,
                    "base_models": len({id(s.base) for s in self.served.values()})}

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while not self.stopping.is_set():
            busy = any(b.rows for b in self.batches.values()) or any(self.waiting.values())
            # idle: sleep until a request comes; busy: take what has come, without waiting
            jobs = [] if busy else [self.incoming.get()]
            while True:
                try:
                    jobs.append(self.incoming.get_nowait())
                except queue.Empty:
                    break
            for job in jobs:
                if job is None:  # stop() waking the loop
                    continue
                if len(job.rows) > self.max_batch:  # the API refuses these; a direct caller is told, not left waiting
                    self._fail([job], ValueError(f"{len(job.rows)} rows, over max_batch {self.max_batch}"))
                else:
                    self.waiting[job.model].append(job)
            for name in self.served:
                try:
                    self._admit(name)
                    if self.batches[name].rows:
                        self._step(name)
                except Exception as e:  # noqa: BLE001  a failed step fails the batch's requests, never the server
                    self._fail([j for j, _ in self.batches[name].rows], e)
                    self.batches[name] = Batch()

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        """Answer each of `jobs` (once, whatever rows it has) with the error; the jobs waiting are not
        touched (they are admitted to a fresh batch)."""
        for job in {id(j): j for j in jobs}.values():
            job.cancelled.set()  # its rows, wherever they are, are not decoded again
            try:
                job.emit(("error", f"{type(error).__name__}: {error}"))
            except RuntimeError:  # the client's event loop is gone (the server is shutting down)
                pass

    def _admit(self, name: str) -> None:
        """Waiting requests join the running batch, first come first served, while their rows fit in
        max_batch (a request that does not fit waits for rows to finish; none is larger than max_batch)."""
        batch, waiting = self.batches[name], self.waiting[name]
        for job in [j for j in waiting if j.cancelled.is_set()]:
            waiting.remove(job)
        if batch.rows and not self.mergeable[name]:
            return  # request-boundary batching: the batch must drain first
        taken: list[Job] = []
        rows = len(batch.rows)
        while waiting and rows + len(waiting[0].rows) <= self.max_batch:
            taken.append(waiting.pop(0))
            rows += len(taken[-1].rows)
            if self.mergeable[name]:  # prefilled alone, as generate would draw it (jobs.py)
                self._start(name, taken)
                taken = []
        if taken:
            self._start(name, taken)

    def _start(self, name: str, jobs: list[Job]) -> None:
        """Prefill `jobs` and merge them into the running batch. What fails before the merge (a seed the
        generator refuses, the prefill's forward pass) fails these jobs alone: the batch is not touched
        until the merge; a failed merge leaves the batch unusable and fails it with them."""
        try:
            part = self._prefill(name, jobs)
        except Exception as e:  # noqa: BLE001  this request's own error, answered to it alone
            self._fail(jobs, e)
            return
        if part is None:
            return
        try:
            self._merge(name, part)
            self._drop_finished(name)
        except Exception as e:  # noqa: BLE001
            self._fail([j for j, _ in self.batches[name].rows] + jobs, e)
            self.batches[name] = Batch()

    @torch.inference_mode()
    def _prefill(self, name: str, jobs: list[Job]) -> Batch | None:
        """The jobs' rows prefilled together and their first tokens drawn: a batch of their own, or None
        when nothing is left to generate."""
        served = self.served[name]
        for job in jobs:
            job.start(self.device)
            if job.settings.echo and job.settings.logprobs is not None:
                self._score_prompts(served, job)
        with self.lock:
            self.counts["requests"] += len(jobs)
            self.counts["prefills"] += 1
        for job in [j for j in jobs if j.settings.max_tokens == 0]:  # echo alone: nothing to generate
            for row in job.rows:
                row.finish = "length"
            self._emit(job)
        rows = [(j, r) for j in jobs if j.settings.max_tokens > 0 for r in j.rows]
        if not rows:
            return None
        ids, mask = left_pad([r.prompt for _, r in rows], served.tokenizer.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate makes them
        cache = DynamicCache(config=served.base.model.config)
        with served.active():
            out = served.base.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                    use_cache=True, logits_to_keep=1)
        part = Batch(rows, cache, mask, positions[:, -1] + 1, None)
        part.inputs = self._advance(rows, out.logits[:, -1].float(), served)
        return part

    @torch.inference_mode()
    def _step(self, name: str) -> None:
        served, batch = self.served[name], self.batches[name]
        ones = torch.ones((len(batch.rows), 1), dtype=batch.mask.dtype, device=self.device)
        mask = torch.cat([batch.mask, ones], 1)
        with served.active():
            out = served.base.model(input_ids=batch.inputs[:, None], attention_mask=mask,
                                    position_ids=batch.positions[:, None], cache=batch.cache, use_cache=True,
                                    logits_to_keep=1)
        batch.mask, batch.positions = mask, batch.positions + 1
        with self.lock:
            self.counts["steps"] += 1
            self.rows_per_step[len(batch.rows)] += 1
            self.requests_per_step[len({id(j) for j, _ in batch.rows})] += 1
        batch.inputs = self._advance(batch.rows, out.logits[:, -1].float(), served)
        self._drop_finished(name)

    def _advance(self, rows: list[tuple[Job, Row]], logits: torch.Tensor, served: Served) -> torch.Tensor:
        """Draw each row's next token with its request's sampler, record it, end rows that stop."""
        next_ids = torch.zeros(len(rows), dtype=torch.long, device=logits.device)
        by_job: dict[int, list[int]] = {}
        for i, (job, _) in enumerate(rows):
            by_job.setdefault(id(job), []).append(i)
        for positions in by_job.values():
            job = rows[positions[0]][0]
            active = [rows[i][1].index for i in positions]
            next_ids[positions] = job.sample(logits[positions], active)
            if job.settings.logprobs is not None:
                logps = torch.log_softmax(logits[positions], -1)
            for k, i in enumerate(positions):
                token = int(next_ids[i])
                self._record(job, rows[i][1], token, served, logps[k] if job.settings.logprobs is not None else None)
            self._emit(job)
        with self.lock:
            self.counts["generated_tokens"] += len(rows)
        return next_ids

    def _record(self, job: Job, row: Row, token: int, served: Served, logps: torch.Tensor | None) -> None:
        row.generated += 1
        if token in served.eos and not job.settings.ignore_eos:
            row.finish = "stop"
            return
        row.tokens.append(token)
        if logps is not None:
            top = torch.topk(logps, job.settings.logprobs) if job.settings.logprobs else None
            row.logprobs.append((token, float(logps[token]),
                                 list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else []))
        # the HTTP side reads row.text without a lock while this runs: the text is cut at a stop string
        # before it is published, and published before the finish that says it is final
        text = served.tokenizer.decode(row.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        finish = None
        if job.settings.stop and (cut := stop_cut(text, job.settings.stop, len(row.text))) is not None:
            text, finish = text[:cut], "stop"
        elif row.generated >= job.settings.max_tokens:
            finish = "length"
        row.text = text
        row.finish = finish

    def _emit(self, job: Job) -> None:
        job.emit(("update", job))

    def _drop_finished(self, name: str) -> None:
        batch = self.batches[name]
        keep = [i for i, (job, row) in enumerate(batch.rows) if row.finish is None and not job.cancelled.is_set()]
        if len(keep) == len(batch.rows):
            return
        if not keep:
            self.batches[name] = Batch()
            return
        index = torch.tensor(keep, device=self.device)
        batch.rows = [batch.rows[i] for i in keep]
        batch.cache.batch_select_indices(index)
        batch.mask, batch.positions, batch.inputs = batch.mask[index], batch.positions[index], batch.inputs[index]
        if self.mergeable.get(name, False):
            # columns that no remaining row attends to (a long prompt that left) are dropped
            start = int(batch.mask.any(0).long().argmax())
            if start:
                batch.mask = batch.mask[:, start:]
                for layer in batch.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def _merge(self, name: str, part: Batch) -> None:
        batch = self.batches[name]
        if not batch.rows:
            self.batches[name] = part
            return
        width = max(batch.mask.shape[1], part.mask.shape[1])
        for a, b in zip(batch.cache.layers, part.cache.layers, strict=True):
            a.keys = torch.cat([_pad_left(a.keys, width), _pad_left(b.keys, width)], 0)
            a.values = torch.cat([_pad_left(a.values, width), _pad_left(b.values, width)], 0)
        batch.mask = torch.cat([_pad_left(batch.mask, width), _pad_left(part.mask, width)], 0)
        batch.positions = torch.cat([batch.positions, part.positions])
        batch.inputs = torch.cat([batch.inputs, part.inputs])
        batch.rows += part.rows

    # ------------------------------------------------------------------ echo: the prompt's own log-probs
    def _score_prompts(self, served: Served, job: Job) -> None:
        k = job.settings.logprobs or 0
        for prompts in {tuple(r.prompt) for r in job.rows}:
            ids = torch.tensor([prompts], device=self.device)
            with served.active():
                logps = torch.log_softmax(served.base.model(input_ids=ids).logits[0, :-1].float(), -1)  # (P-1, V)
            scored = [(prompts[0], None, [])]
            for t, token in enumerate(prompts[1:]):
                top = torch.topk(logps[t], k) if k else None
                scored.append((token, float(logps[t, token]),
                               list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else []))
            for row in job.rows:
                if tuple(row.prompt) == prompts:
                    row.prompt_logprobs = scored


def _mergeable(served: Served) -> bool:
    """Whether the model's cache is plain key/value layers that rows can be padded and merged into."""
    cache = DynamicCache(config=served.base.model.config)
    if cache.layers:
        return all(type(layer) is DynamicLayer for layer in cache.layers)
    return cache.layer_class_to_replicate is DynamicLayer


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Masked columns on the left of the sequence dimension: -2 of a (B, H, T, D) cache tensor, -1 of a mask."""
    missing = width - t.shape[-2 if t.dim() == 4 else -1]
    if missing == 0:
        return t
    return F.pad(t, (0, 0, missing, 0) if t.dim() == 4 else (missing, 0))

