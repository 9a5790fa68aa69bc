"""Turn raw rows of any supported shape into validated records, or into a problem naming the field.

Shapes:
  pairs        {"prompt": str, "chosen": str, "rejected": str}
  conversation {"chosen": [msgs], "rejected": [msgs]} (+ optional "prompt": [msgs]); without a
               prompt, the shared prefix of the two conversations becomes the prompt
  hh           Anthropic HH-RLHF: "chosen"/"rejected" transcripts of "\\n\\nHuman: ... \\n\\nAssistant: ..."
  sharegpt     LLaMA-Factory: "conversations" [{from, value}] + "chosen"/"rejected" {from, value}; without
               chosen/rejected, a demonstration (LLaMA-Factory's SFT shape), as `sft` {"messages"}
  kto          {"prompt", "completion", "label": bool} or LLaMA-Factory's {"messages", "label"}
  sft          {"prompt", "completion"} or {"messages"} (the last assistant turn is the completion),
               no label: demonstrations for supervised fine-tuning (read as desirable completions)
  ranked       {"prompt", "responses": [...], "scores": [...]} expanded into pairs
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterator
from typing import Any

from ..config import shown
from ..errors import ConfigError
from .readers import Row
from .records import Location, Message, PreferencePair, Problem, Record, Text, UnpairedExample

SHAPES = ("pairs", "conversation", "hh", "sharegpt", "kto", "sft", "ranked")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "function_call": "assistant"}
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
RANKED_MODES = ("best_vs_rest", "best_vs_worst", "all")
MAX_DEPTH = 64  # levels of free-form JSON (tool call arguments) a kept record may hold


class Bad(Exception):
    """Raised inside a parser; becomes a Problem with the row's location."""

    def __init__(self, field: str, message: str, kind: str):
        super().__init__(message)
        self.field, self.message, self.kind = field, message, kind


def detect_shape(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    keys = set(value)
    if {"responses", "scores"} <= keys:
        return "ranked"
    if "label" in keys and ("completion" in keys or "messages" in keys):
        return "kto"
    if "completion" in keys or ("messages" in keys and "chosen" not in keys):
        return "sft"
    if "conversations" in keys:
        return "sharegpt"
    chosen = value.get("chosen")
    if isinstance(chosen, (list, dict)):
        return "conversation"
    if isinstance(chosen, str):
        if "prompt" in keys:
            return "pairs"
        if HH_ASSISTANT in chosen:
            return "hh"
    if "prompt" in keys and "chosen" in keys:
        return "pairs"
    return None


# ---------------------------------------------------------------- field checks


def norm(text: str) -> str:
    """Whitespace- and case-normalised text: what 'the same answer' means for ties and duplicates."""
    return " ".join(text.split()).lower()


def _string(row: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        raise Bad(key, "missing", "missing")
    value = row[key]
    if not isinstance(value, str):
        raise Bad(key, f"expected text, got {type(value).__name__}", "type")
    _check_unicode(value, key)
    if not allow_empty and blank(value):
        raise Bad(key, "is empty", "empty")
    return value


def blank(text: str) -> bool:
    """Nothing a reader sees: whitespace and format characters only (zero-width space and joiners, BOM,
    direction marks), so an answer of "\u200b" is as empty as one of " "."""
    s = text.strip()
    # most texts start with a visible character: the per-character scan runs only for the rest
    return not s or (unicodedata.category(s[0]) == "Cf" and all(c.isspace() or unicodedata.category(c) == "Cf"
                                                               for c in s))


def _check_unicode(value: str, field: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Bad(field, "holds an unpaired surrogate (not valid UTF-8)", "utf8") from None


def _messages(value: Any, field: str, *, from_key: str = "role", text_key: str = "content",
              role_map: dict[str, str] | None = None) -> list[Message]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise Bad(field, f"expected a list of messages, got {type(value).__name__}", "type")
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise Bad(where, f"expected a message object, got {type(m).__name__}", "type")
        role = m.get(from_key)
        if role_map is not None:
            if not isinstance(role, str) or role not in role_map:  # a list or object is no speaker (nor hashable)
                raise Bad(f"{where}.{from_key}", f"unknown speaker {shown(role)} (expected one of "
                          f"{', '.join(role_map)})", "roles")
            role = role_map[role]
        elif role not in ROLES:
            raise Bad(f"{where}.{from_key}", f"unknown role {shown(role)} (expected one of {', '.join(ROLES)})",
                      "roles")
        content, calls = m.get(text_key), m.get("tool_calls")
        if calls is not None:
            _tool_calls(calls, role, f"{where}.tool_calls")
            content = "" if content is None else content  # a turn that only calls tools (OpenAI's null content)
        if not isinstance(content, str):
            kind = "missing" if content is None else "type"
            raise Bad(f"{where}.{text_key}", "missing" if content is None else
                      f"expected text, got {type(content).__name__}", kind)
        _check_unicode(content, f"{where}.{text_key}")
        if blank(content) and not calls:
            raise Bad(f"{where}.{text_key}", "is empty", "empty")
        out.append(_with_calls({"role": role, "content": content}, m, where))
    if not out:
        raise Bad(field, "has no messages", "empty")
    return out


def _with_calls(message: Message, m: dict, where: str) -> Message:
    """Tool calls and the ids/names tying tool results to them reach the chat template as given."""
    for key in ("tool_calls", "tool_call_id", "name"):
        if m.get(key) is not None:
            if key != "tool_calls":
                if not isinstance(m[key], str):
                    raise Bad(f"{where}.{key}", f"expected text, got {type(m[key]).__name__}", "type")
                _check_unicode(m[key], f"{where}.{key}")
            message[key] = m[key]
    return message


def _tool_calls(calls: Any, role: str, field: str) -> None:
    """OpenAI's shape, [{"type": "function", "function": {"name", "arguments"}}], or the bare
    {"name", "arguments"} transformers also takes; arguments an object or a JSON string."""
    if role != "assistant":
        raise Bad(field, f"only an assistant turn makes tool calls, not a {role} turn", "roles")
    if not isinstance(calls, list) or not calls:
        raise Bad(field, "expected a non-empty list of tool calls", "type")
    for i, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise Bad(f"{field}[{i}]", "expected {\"function\": {\"name\": ..., \"arguments\": ...}}", "type")
        if not isinstance(fn.get("arguments", {}), (dict, str)):
            raise Bad(f"{field}[{i}].function.arguments", "expected an object or a JSON string", "type")
        _check_nested(call, f"{field}[{i}]")


def _check_nested(value: Any, field: str) -> None:
    """Free-form JSON that reaches a kept record (a tool call's arguments): every text valid UTF-8 (keys
    too), and no deeper than MAX_DEPTH, since writing, hashing and rendering it each recurse per level."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise Bad(field, f"nested deeper than {MAX_DEPTH} levels", "type")
        if isinstance(item, str):
            _check_unicode(item, field)
        elif isinstance(item, dict):
            for k, v in item.items():
                _check_unicode(str(k), field)
                stack.append((v, depth + 1))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def check_turns(messages: list[Message], field: str, *, last: str | None = None) -> None:
    """A system message only first; user and assistant alternate, starting with user; tool follows assistant."""
    previous = None
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system" and i != 0:
            raise Bad(f"{field}[{i}].role", "a system message may only come first", "roles")
        if role == "user" and previous == "user":
            raise Bad(f"{field}[{i}].role", "two user turns in a row", "roles")
        if role == "assistant" and previous in (None, "system"):
            raise Bad(f"{field}[{i}].role", "the conversation must start with a user turn", "roles")
        if role == "assistant" and previous == "assistant":
            raise Bad(f"{field}[{i}].role", "two assistant turns in a row", "roles")
        if role == "tool" and previous not in ("assistant", "tool"):
            raise Bad(f"{field}[{i}].role", "a tool result must follow an assistant turn", "roles")
        previous = role
    if last is not None and previous != last:
        raise Bad(field, f"must end with a {last} turn, ends with {previous}", "roles")


def _not_tie(chosen: Text, rejected: Text) -> None:
    def key(t):
        return (norm(t) if isinstance(t, str) else [(m["role"], norm(m["content"]), repr(m.get("tool_calls")))
                                                     for m in t])
    if key(chosen) == key(rejected):
        raise Bad("rejected", "chosen and rejected are the same answer (a tie)", "tie")


# ---------------------------------------------------------------- one parser per shape


def parse_pairs(row: dict, where: Location, **_: Any) -> list[Record]:
    prompt, chosen, rejected = _string(row, "prompt"), _string(row, "chosen"), _string(row, "rejected")
    _not_tie(chosen, rejected)
    return [PreferencePair(prompt, chosen, rejected, where, margin=_margin(row))]


def _margin(row: dict) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Bad("margin", f"expected a finite number, got {shown(value)}", "type")
    return float(value)


def parse_conversation(row: dict, where: Location, **_: Any) -> list[Record]:
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise Bad(key, "missing", "missing")
    chosen, rejected = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
    if row.get("prompt") is not None:
        prompt = _messages(row["prompt"], "prompt")
        check_turns(prompt, "prompt", last="user")
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            check_turns(prompt + answer, name, last="assistant")
    else:
        for name, conv in (("chosen", chosen), ("rejected", rejected)):
            check_turns(conv, name, last="assistant")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        # The prompt ends at the last user turn of the shared prefix: the answers start after it.
        while shared > 0 and chosen[shared - 1]["role"] != "user":
            shared -= 1
        if shared == 0:
            raise Bad("chosen", "chosen and rejected share no prompt (no common user turn)", "prompt")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not chosen or not rejected:
            raise Bad("rejected" if not rejected else "chosen", "has no answer after the shared prompt", "empty")
    _not_tie(chosen, rejected)
    return [PreferencePair(prompt, chosen, rejected, where, margin=_margin(row))]


def split_hh(transcript: str, field: str) -> tuple[str, str]:
    """HH-RLHF: the prompt is everything up to and including the last '\\n\\nAssistant:'."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise Bad(field, "no '\\n\\nAssistant:' turn in the transcript", "format")
    if HH_HUMAN not in transcript[:cut]:
        raise Bad(field, "no '\\n\\nHuman:' turn before the last Assistant turn", "format")
    end = cut + len(HH_ASSISTANT)
    return transcript[:end], transcript[end:]


def parse_hh(row: dict, where: Location, **_: Any) -> list[Record]:
    chosen_t, rejected_t = _string(row, "chosen"), _string(row, "rejected")
    prompt, chosen = split_hh(chosen_t, "chosen")
    prompt_r, rejected = split_hh(rejected_t, "rejected")
    if prompt != prompt_r:
        raise Bad("rejected", "the transcripts differ before the last Assistant turn", "prompt")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if blank(answer):
            raise Bad(name, "the last Assistant turn is empty", "empty")
    _not_tie(chosen, rejected)
    return [PreferencePair(prompt, chosen, rejected, where)]


def parse_sharegpt(row: dict, where: Location, **_: Any) -> list[Record]:
    if row.get("conversations") is None:
        raise Bad("conversations", "missing", "missing")
    sg = dict(from_key="from", text_key="value", role_map=SHAREGPT_ROLES)
    prompt = _messages(row["conversations"], "conversations", **sg)
    system = row.get("system")
    if system:
        if not isinstance(system, str):
            raise Bad("system", f"expected text, got {type(system).__name__}", "type")
        _check_unicode(system, "system")
        prompt = [{"role": "system", "content": system}] + prompt
    if row.get("chosen") is None and row.get("rejected") is None:
        # LLaMA-Factory's SFT shape: a whole conversation (function_call/observation turns included),
        # read as a demonstration whose last assistant turn is the completion
        check_turns(prompt, "conversations", last="assistant")
        return [UnpairedExample(prompt[:-1], prompt[-1:], True, where)]
    check_turns(prompt, "conversations", last="user")
    answers = []
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise Bad(key, "missing", "missing")
        answer = _messages(row[key], key, **sg)
        check_turns(prompt + answer, key, last="assistant")
        answers.append(answer)
    _not_tie(*answers)
    return [PreferencePair(prompt, answers[0], answers[1], where)]


def _label(row: dict) -> bool:
    if "label" not in row or row["label"] is None:
        raise Bad("label", "missing", "missing")
    value = row["label"]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise Bad("label", f"expected true or false, got {shown(value)}", "type")


def parse_kto(row: dict, where: Location, *, label: bool | None = None, **_: Any) -> list[Record]:
    label = _label(row) if label is None else label
    if "messages" in row and "completion" not in row:
        messages = _messages(row["messages"], "messages")
        check_turns(messages, "messages", last="assistant")
        if len(messages) < 2:
            raise Bad("messages", "needs a prompt before the answer", "prompt")
        return [UnpairedExample(messages[:-1], messages[-1:], label, where)]
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        prompt_v: Text = _messages(prompt, "prompt")
        completion: Text = _messages(row.get("completion"), "completion")
    else:
        prompt_v, completion = _string(row, "prompt"), _string(row, "completion")
    return [UnpairedExample(prompt_v, completion, label, where)]


def parse_sft(row: dict, where: Location, **_: Any) -> list[Record]:
    """A demonstration: the kto shape without a label, every completion desirable."""
    if "label" in row:
        raise Bad("label", "demonstrations carry no label (labelled completions are the kto format)", "type")
    return parse_kto(row, where, label=True)


def _ranked_answer(r: Any, i: int) -> Text:
    if not isinstance(r, str):
        return _messages(r, f"responses[{i}]")
    _check_unicode(r, f"responses[{i}]")
    if blank(r):
        raise Bad(f"responses[{i}]", "is empty", "empty")
    return r


def parse_ranked(row: dict, where: Location, *, ranked: str = "best_vs_rest", **_: Any) -> list[Record]:
    prompt = row.get("prompt")
    prompt_v: Text = _messages(prompt, "prompt") if isinstance(prompt, list) else _string(row, "prompt")
    responses, scores = row.get("responses"), row.get("scores")
    if not isinstance(responses, list):
        raise Bad("responses", "missing" if responses is None else "expected a list", "missing"
                  if responses is None else "type")
    if not isinstance(scores, list):
        raise Bad("scores", "missing" if scores is None else "expected a list", "missing"
                  if scores is None else "type")
    if len(responses) != len(scores):
        raise Bad("scores", f"{len(scores)} scores for {len(responses)} responses", "length")
    if len(responses) < 2:
        raise Bad("responses", "needs at least two responses to rank", "length")
    answers = [_ranked_answer(r, i) for i, r in enumerate(responses)]
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise Bad(f"scores[{i}]", f"expected a finite number, got {shown(s)}", "type")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    best, worst = order[0], order[-1]
    if ranked == "best_vs_worst":
        index_pairs = [(best, worst)]
    elif ranked == "best_vs_rest":
        index_pairs = [(best, j) for j in order[1:]]
    elif ranked == "all":
        index_pairs = [(a, b) for k, a in enumerate(order) for b in order[k + 1:]]
    else:
        raise ConfigError(f"unknown ranked mode {ranked!r}; choose one of {', '.join(RANKED_MODES)}")
    pairs = []
    for a, b in index_pairs:
        if scores[a] == scores[b]:
            continue  # equal scores say nothing about preference
        pairs.append(PreferencePair(prompt_v, answers[a], answers[b], where, margin=float(scores[a] - scores[b])))
    if not pairs:
        raise Bad("scores", "every response has the same score (a tie)", "tie")
    return pairs


def parse_prompt(row: dict, where: Location) -> Text:
    """A prompt for sampling (RL, `prefalign sample`): {"prompt": text or messages ending with a user
    turn}, or the prompt of any record shape above."""
    shape = detect_shape(row)
    if shape is not None:
        records = PARSERS[shape](row, where)
        return records[0].prompt
    if "prompt" not in row:
        raise Bad("prompt", "missing", "missing")
    if isinstance(row["prompt"], list):
        messages = _messages(row["prompt"], "prompt")
        check_turns(messages, "prompt", last="user")
        return messages
    return _string(row, "prompt")


PARSERS = {"pairs": parse_pairs, "conversation": parse_conversation, "hh": parse_hh,
           "sharegpt": parse_sharegpt, "kto": parse_kto, "sft": parse_sft, "ranked": parse_ranked}


def parse_rows(rows: Iterator[Row | Problem], shape: str = "auto", *, ranked: str = "best_vs_rest",
               ) -> Iterator[tuple[Row | Problem, list[Record] | Problem]]:
    """Yield (row, records) or (row, problem) for every row. With shape 'auto' the first object
    whose shape is recognisable fixes the shape for the whole file, so that later records with a
    missing field are reported as such rather than as 'unknown shape'."""
    if shape != "auto" and shape not in PARSERS:
        raise ConfigError(f"unknown format {shape!r}; choose one of: auto, {', '.join(SHAPES)}")
    fixed = None if shape == "auto" else shape
    for row in rows:
        if isinstance(row, Problem):
            yield row, row
            continue
        if not isinstance(row.value, dict):
            yield row, Problem(row.where, "", f"expected a JSON object, got {type(row.value).__name__}",
                               "type", raw=row.raw)
            continue
        current = fixed or detect_shape(row.value)
        if current is None:
            keys = ", ".join(sorted(str(k).encode("utf-8", "backslashreplace").decode() for k in row.value))
            yield row, Problem(row.where, "", f"cannot tell the record's shape from its keys ({keys or 'none'}); "
                               "pass --format", "shape", raw=row.raw)
            continue
        if fixed is None and shape == "auto":
            fixed = current
        try:
            yield row, PARSERS[current](row.value, row.where, ranked=ranked)
        except Bad as e:
            yield row, Problem(row.where, e.field, e.message, e.kind, raw=row.raw)
