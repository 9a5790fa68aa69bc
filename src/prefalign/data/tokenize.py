"""Tokenization for training: prompt and completion tokenized *together*, the loss mask from the seam.

Tokenizing the completion alone and concatenating gives different tokens at the seam for BPE
tokenizers ("Answer: " + "yes" is not "Answer:" + " yes"), i.e. sequences the model never sees at
inference. We tokenize the full text once and find the boundary from character offsets: every token
that ends past the prompt's last character is a completion token (a token straddling the seam is
scored, since it carries completion characters).

Conversations (messages) go through the chat template (data/chat.py), which says which tokens each
assistant turn wrote: those of the completion's assistant turns are scored, or with `all_turns` those of
every assistant turn (multi-turn SFT); system, user and tool messages never are.
"""

from __future__ import annotations

from dataclasses import dataclass

from .chat import TokenizationError, conversation_mask
from .records import PreferencePair, Text

__all__ = ["TokenizationError", "Tokenized", "tokenize", "tokenize_pair", "truncate"]


@dataclass
class Tokenized:
    input_ids: list[int]
    prompt_len: int  # tokens [0, prompt_len) are the prompt; the first scored token is at prompt_len
    truncated: bool = False
    # per token: scored. None: every token from prompt_len on. Multi-turn conversations have unscored
    # stretches after prompt_len (the user and tool turns between assistant turns)
    mask: list[bool] | None = None

    @property
    def loss_mask(self) -> list[bool]:
        return self.mask if self.mask is not None else \
            [False] * self.prompt_len + [True] * (len(self.input_ids) - self.prompt_len)

    @property
    def scored(self) -> list[int]:
        """Positions of the scored tokens."""
        if self.mask is None:
            return list(range(self.prompt_len, len(self.input_ids)))
        return [t for t, on in enumerate(self.mask) if on]

    @property
    def completion_len(self) -> int:
        return len(self.scored) if self.mask is not None else len(self.input_ids) - self.prompt_len


def _messages(text: Text, role: str) -> list:
    return [{"role": role, "content": text}] if isinstance(text, str) else list(text)


def tokenize(tokenizer, prompt: Text, completion: Text, *, max_length: int | None = None,
             max_prompt_length: int | None = None, add_eos: bool = True, all_turns: bool = False) -> Tokenized:
    """One sequence and its scored tokens. Plain text: the completion. Messages (either side a list):
    the completion's assistant turns; with all_turns, every assistant turn of prompt + completion."""
    if isinstance(prompt, str) and isinstance(completion, str):
        ids, prompt_len, added = _plain(tokenizer, prompt, completion)
        mask = None
    else:
        p_msgs, c_msgs = _messages(prompt, "user"), _messages(completion, "assistant")
        ids, scored = conversation_mask(tokenizer, p_msgs + c_msgs, 0 if all_turns else len(p_msgs))
        if not any(scored):
            raise TokenizationError("the completion produced no tokens")
        # nothing after the last scored token is read (what a template writes after the final turn)
        end = max(t for t, on in enumerate(scored) if on) + 1
        ids, scored = ids[:end], scored[:end]
        prompt_len = scored.index(True)
        mask = scored if not all(scored[prompt_len:]) else None
        added = False  # the template wrote every token; a BOS in it is the template's or the data's
    bos = tokenizer.bos_token_id
    # A prompt already rendered with its BOS, and the tokenizer adds one more: drop the added one. Only
    # that one: a BOS written in the data is text like any other (make faults found `<s><s>` losing one).
    if added and prompt_len > 1 and ids[1] == bos:
        ids, prompt_len, mask = ids[1:], prompt_len - 1, mask[1:] if mask is not None else None
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None:
        tail = ids[max(prompt_len, len(ids) - 3):]
        if eos not in tail:
            ids.append(eos)
            mask = mask + [True] if mask is not None else None
    if prompt_len >= len(ids):
        raise TokenizationError("the completion produced no tokens")
    return truncate(Tokenized(ids, prompt_len, mask=mask), max_length, max_prompt_length, bos)


def _plain(tokenizer, prompt: str, completion: str) -> tuple[list[int], int, bool]:
    """The ids, the prompt's length and whether the tokenizer added a BOS of its own in front."""
    enc = tokenizer(prompt + completion, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    boundary = len(prompt)
    prompt_len = 0
    # The scan stops at the first completion token, so special tokens a post-processor appends
    # (offset (0, 0)) after it stay in the completion.
    while prompt_len < len(ids) and offsets[prompt_len][1] <= boundary:
        prompt_len += 1
    bos = tokenizer.bos_token_id
    added = bool(ids) and bos is not None and ids[0] == bos and tuple(offsets[0]) == (0, 0)
    return ids, prompt_len, added


def truncate(t: Tokenized, max_length: int | None, max_prompt_length: int | None,
             bos: int | None = None) -> Tokenized:
    """Keep the end of the prompt (what the answer responds to) and the start of the completion."""
    if max_length is None or len(t.input_ids) <= max_length:
        return t
    prompt, completion = t.input_ids[:t.prompt_len], t.input_ids[t.prompt_len:]
    keep_prompt = max_prompt_length if max_prompt_length is not None else max_length // 2
    keep_prompt = min(keep_prompt, len(prompt), max_length - 1)
    if len(prompt) > keep_prompt:
        lead = [prompt[0]] if bos is not None and prompt[0] == bos and keep_prompt > 1 else []
        prompt = lead + prompt[len(prompt) - (keep_prompt - len(lead)):]
    completion = completion[:max_length - len(prompt)]
    mask = None if t.mask is None else [False] * len(prompt) + t.mask[t.prompt_len:][:len(completion)]
    return Tokenized(prompt + completion, len(prompt), truncated=True, mask=mask)


def tokenize_pair(tokenizer, pair: PreferencePair, **kw) -> tuple[Tokenized, Tokenized]:
    return tokenize(tokenizer, pair.prompt, pair.chosen, **kw), tokenize(tokenizer, pair.prompt, pair.rejected, **kw)
