"""The record types every reader produces, and the problem type every check reports.

A prompt or completion is either plain text or a list of chat messages ({"role", "content"}).
Plain text is used verbatim (raw-text formats such as HH-RLHF); messages go through the
tokenizer's chat template at tokenization time.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Union

Message = dict[str, Any]  # role, content; tool_calls, tool_call_id, name where given
Text = Union[str, list[Message]]


@dataclass(frozen=True)
class Location:
    file: str
    line: int  # 1-based line of the record's start (JSON/JSONL/CSV) or 1-based row (Parquet/Arrow)
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.unit == "line" else f"{self.file}:{self.unit} {self.line}"


@dataclass
class Problem:
    where: Location
    field: str  # "" when the whole record is at fault (bad JSON, not an object)
    message: str
    kind: str  # short machine-readable category: json, type, missing, empty, tie, utf8, roles, corrupt, ...
    raw: Any = None  # the record as it was read, verbatim where the format allows

    def __str__(self) -> str:
        where = f"{self.where}: {self.field}: " if self.field else f"{self.where}: "
        return where + self.message

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.where.file, self.where.unit: self.where.line,
                               "field": self.field, "kind": self.kind, "problem": self.message}
        raw = self.raw
        if isinstance(raw, bytes):
            # invalid UTF-8 cannot travel inside JSON text: keep the exact bytes alongside

            out["raw"] = raw.decode("utf-8", errors="replace")
            out["raw_base64"] = base64.b64encode(raw).decode("ascii")
        else:
            out["raw"] = raw
        return out


@dataclass
class PreferencePair:
    prompt: Text
    chosen: Text
    rejected: Text
    where: Location | None = None
    margin: float | None = None  # score(chosen) - score(rejected) when known (ranked data, a judge)
    meta: dict[str, Any] = field(default_factory=dict)

    kind = "pair"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.margin is not None:
            out["margin"] = self.margin
        if self.where is not None:
            out["source"] = str(self.where)
        return out


@dataclass
class UnpairedExample:
    """One completion marked desirable (label True) or undesirable, as KTO consumes."""

    prompt: Text
    completion: Text
    label: bool
    where: Location | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    kind = "unpaired"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "completion": self.completion, "label": self.label}
        if self.where is not None:
            out["source"] = str(self.where)
        return out


Record = Union[PreferencePair, UnpairedExample]


def text_of(value: Text) -> str:
    """A flat string for lengths, hashing and display; messages become 'role: content' lines."""
    if isinstance(value, str):
        return value
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}"
                     + (f" {json.dumps(m['tool_calls'], ensure_ascii=False, sort_keys=True)}" if m.get("tool_calls")
                        else "") for m in value)


# Unicode line breaks JSON leaves raw inside a string: escaped, so that a line of a JSONL file prefalign writes
# stays one line for readers that split on them too (Python's str.splitlines); the value reads back the same
LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def json_line(obj: Any) -> str:
    """One JSONL line of a problem or a set-aside record, whatever the input held: text with an unpaired
    surrogate (a JSON \\ud800 escape read back) is written \\u-escaped, which reads back the same, and a
    value JSON has no type for (Parquet bytes, dates) as text."""
    text = json.dumps(obj, ensure_ascii=False, default=_as_text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, default=_as_text)
    return text.translate(LINE_BREAKS)


def _as_text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def dumps(record: Record) -> str:
    return json.dumps(record.to_json(), ensure_ascii=False).translate(LINE_BREAKS)
