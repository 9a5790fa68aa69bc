"""OpenAI's response shapes: completions, chat completions, their stream chunks, logprobs and errors."""

from __future__ import annotations

import time
import uuid
from typing import Any

from .jobs import Job, Row


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Tokens:
    """How a token is named in logprobs: its text, or 'token_id:N' (vLLM's return_tokens_as_token_ids)."""

    def __init__(self, tokenizer, as_ids: bool):
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def __call__(self, token: int) -> str:
        return f"token_id:{token}" if self.as_ids else self.tokenizer.decode([token])


def usage(job: Job) -> dict:
    n = len(job.rows) // max(job.n_prompts, 1)
    prompt = sum(len(job.rows[i * n].prompt) for i in range(job.n_prompts))
    completion = sum(r.generated for r in job.rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(entries: list, name: Tokens, offset: int = 0) -> dict:
    """The legacy completions shape: parallel lists over tokens (entries: (token, logprob, top))."""
    tokens, lps, tops, offsets = [], [], [], []
    for token, lp, top in entries:
        text = name(token)
        tokens.append(text)
        lps.append(lp)
        tops.append({name(t): v for t, v in top} if lp is not None else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list, name: Tokens) -> dict:
    def one(token: int, lp: float) -> dict:
        text = name(token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(token, lp), "top_logprobs": [one(t, v) for t, v in top]} for token, lp, top in entries]}


class Reply:
    """Builds one request's response (whole, or as stream chunks) from its job's rows."""

    def __init__(self, job: Job, chat: bool, name: Tokens, prompt_texts: list[str] | None = None,
                 with_logprobs: bool = False):
        self.job, self.chat, self.name, self.with_logprobs = job, chat, name, with_logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt_texts = prompt_texts  # echo: the prompt's text before each completion
        self.sent_logprobs = [0] * len(job.rows)
        self.started = [False] * len(job.rows)
        self.closed = [False] * len(job.rows)  # the row's last chunk (with its finish_reason) went out

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.job.model,
                "system_fingerprint": None}

    def _echo(self, row: Row) -> str:
        return self.prompt_texts[row.index // (len(self.job.rows) // self.job.n_prompts)] if self.prompt_texts else ""

    def _logprobs(self, row: Row, entries: list) -> dict | None:
        if not self.with_logprobs:
            return None
        if self.chat:
            return chat_logprobs(entries, self.name)
        return completion_logprobs(entries, self.name)

    def whole(self) -> dict:
        choices = []
        for row in self.job.rows:
            entries = (row.prompt_logprobs or []) + row.logprobs if self.prompt_texts else row.logprobs
            if self.chat:
                choices.append({"index": row.index, "message": {"role": "assistant", "content": row.text},
                                "logprobs": self._logprobs(row, entries), "finish_reason": row.finish})
            else:
                choices.append({"index": row.index, "text": self._echo(row) + row.text,
                                "logprobs": self._logprobs(row, entries), "finish_reason": row.finish})
        return {**self._head(False), "choices": choices, "usage": usage(self.job)}

    def chunks(self, sendable) -> list[dict]:
        """The chunks that what was generated since the last call makes (one per row that moved; a chat
        row's last chunk is OpenAI's `delta: {}` with the finish_reason, after its last text).
        `sendable(text)`: how much of a running row's text may go out yet."""
        out = []
        for row in self.job.rows:
            if self.closed[row.index]:
                continue
            finish = row.finish  # read before the text: a finished row's text is final
            text = row.text  # read once: the engine thread replaces it while this runs
            end = len(text) if finish is not None else sendable(text)
            delta = text[row.sent:end] if end > row.sent else ""
            n_lp = len(row.logprobs)
            entries = row.logprobs[self.sent_logprobs[row.index]:n_lp]
            first = not self.started[row.index]
            if not delta and finish is None and not first:
                continue
            if first and not self.chat and self.prompt_texts:
                delta = self._echo(row) + delta
                entries = (row.prompt_logprobs or []) + entries
            if self.chat:
                if delta or first:
                    out.append(self._chunk(row.index, {"role": "assistant", "content": delta} if first else
                                           {"content": delta}, self._logprobs(row, entries), None))
                if finish is not None:
                    out.append(self._chunk(row.index, {}, None, finish))
            else:
                out.append(self._chunk(row.index, None, self._logprobs(row, entries), finish, text=delta))
            row.sent = max(row.sent, end)
            self.sent_logprobs[row.index] = n_lp
            self.started[row.index] = True
            self.closed[row.index] = finish is not None
        return out

    def _chunk(self, index: int, delta: dict | None, logprobs: dict | None, finish: str | None,
               text: str | None = None) -> dict:
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = text
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self) -> dict:
        return {**self._head(True), "choices": [], "usage": usage(self.job)}
