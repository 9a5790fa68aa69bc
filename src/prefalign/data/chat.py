"""Chat templates: the `chat_template` option, and which tokens of a conversation are the assistant's.

`chat_template: NAME | FILE` replaces the tokenizer's template. A NAME is one of the templates shipped
in prefalign/assets/chat_templates/ (a bare word: chatml, zephyr, llama3); anything else is a path to a
Jinja file. A conversation with no template to render it is an error that names the option: joining
messages as plain text would train the model on a format nobody serves it with.

Which tokens are trained (the loss mask) is found per assistant turn, in one of two ways:
- the template's own `{% generation %}` blocks (transformers' return_assistant_tokens_mask), when it
  has them: the template's author said what the model writes;
- otherwise by prefix differences: conversation[:i] rendered with the generation prompt is the text
  before assistant turn i, conversation[:i+1] the text through it; the difference is the turn as the
  model writes it (content, tool calls, end-of-turn token and what the template writes after it up to
  the next message, e.g. ChatML's "<|im_end|>\\n", as TRL's training templates mark it). This needs every
  such prefix to be the start of the whole rendered conversation; a template that rewrites earlier turns
  (e.g. one that drops the reasoning of earlier answers) is refused with the reason, never guessed.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError, DataError
from .records import Message

TEMPLATES = Path(__file__).resolve().parent.parent / "assets" / "chat_templates"
GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as transformers detects the blocks


class TokenizationError(DataError):
    pass


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATES.glob("*.jinja"))


def resolve_chat_template(spec: str) -> str:
    """The Jinja text of `chat_template: NAME | FILE`: a shipped name (a bare word), else a file path."""
    names = template_names()
    if spec in names:
        return (TEMPLATES / f"{spec}.jinja").read_text(encoding="utf-8")
    path = Path(spec).expanduser()
    if not path.is_file():
        hint = " (a name has no '/' or '.')" if "/" not in spec and "." not in spec else ""
        raise ConfigError(f"chat_template: {spec!r} is neither a shipped template ({', '.join(names)}){hint} nor "
                          "an existing file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"chat_template: {path}: cannot read it as UTF-8 text: {e}") from None
    if not text.strip():
        raise ConfigError(f"chat_template: {path}: the file is empty")
    return text


def set_chat_template(tokenizer, spec: str | None):
    """Apply `chat_template` (unset: the tokenizer keeps its own). Saving the tokenizer afterwards (a
    run's final/) writes the template with it, so the trained model is served the way it was trained."""
    if spec:
        tokenizer.chat_template = resolve_chat_template(spec)
    return tokenizer


def template_of(tokenizer) -> str:
    """The tokenizer's template text; a clear error naming `chat_template` when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates (older transformers): the default one
        template = template.get("default")
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise ConfigError(f"{name}: the data holds conversations (messages) but this tokenizer has no chat template: "
                          f"set chat_template to a shipped template ({', '.join(template_names())}) or a Jinja "
                          "file (prefalign does not join messages as plain text)")
    return template


def conversation_mask(tokenizer, messages: list[Message], first: int) -> tuple[list[int], list[bool]]:
    """(token ids of the rendered conversation, per token: is it written by an assistant turn at message
    index >= first). Tokens are scored when they overlap the turn's characters (a token straddling the
    edge carries some of the turn's text)."""
    template = template_of(tokenizer)
    if any(m.get("tool_calls") for m in messages) and "tool_calls" not in template:
        raise ConfigError("the data has assistant tool_calls but the chat template never reads them: they would "
                          "be dropped from the text silently; set chat_template to one that renders them (chatml, "
                          "zephyr, llama3) or put the calls in the message content")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first]
    if not turns:
        raise TokenizationError("no assistant turn to train on")
    if GENERATION.search(template):
        return _generation_mask(tokenizer, messages, turns)
    text, spans = _prefix_spans(tokenizer, messages, turns)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # the template wrote BOS
    mask = [any(end > a and start < b for a, b in spans) for start, end in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def _render(tokenizer, messages: list[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _prefix_spans(tokenizer, messages: list[Message], turns: list[int]) -> tuple[str, list[tuple[int, int]]]:
    full = _render(tokenizer, messages, False)
    spans = []
    for i in turns:
        before, through = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[:i + 1], False)
        if not through.startswith(before):
            raise TokenizationError(f"messages[{i}]: the chat template renders the conversation before this "
                                    "assistant turn differently with and without the turn: cannot tell where the "
                                    "turn starts")
        if not full.startswith(through):
            raise TokenizationError(f"messages[{i}]: the chat template renders this assistant turn differently once "
                                    "later messages follow (it rewrites earlier turns, e.g. drops their reasoning): "
                                    "use assistant_turns: last, or a chat_template with {% generation %} blocks")
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    return full, spans


def _generation_mask(tokenizer, messages: list[Message], turns: list[int]) -> tuple[list[int], list[bool]]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, marked = list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]
    # one run of marked tokens per assistant message, in order: keep the runs of the turns asked for
    runs: list[list[int]] = []
    for t, on in enumerate(marked):
        if on and (t == 0 or not marked[t - 1]):
            runs.append([])
        if on:
            runs[-1].append(t)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if len(runs) != len(assistant):
        raise TokenizationError(f"the chat template's {{% generation %}} blocks mark {len(runs)} spans of tokens for "
                                f"{len(assistant)} assistant turns: cannot tell which turn each belongs to")
    mask = [False] * len(ids)
    for i, run in zip(assistant, runs, strict=True):
        if i in turns:
            for t in run:
                mask[t] = True
    return ids, mask
