"""Tokenization for training: prompt and completion tokenized *together*, the loss mask from the seam.

Tokenizing the completion alone and concatenating gives different tokens at the seam for BPE
tokenizers ("Answer: " + "yes" is not "Answer:" + " yes"), i.e. sequences the model never sees at
inference. We tokenize the full text once and find the boundary from character offsets: every token
that ends past the prompt's last character is a completion token (a token straddling the seam is
scored, since it carries completion characters).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError
from .records import PreferencePair, Text


class TokenizationError(DataError):
    pass


@dataclass
class Tokenized:
    input_ids: list[int]
    prompt_len: int  # tokens [0, prompt_len) are the prompt; the rest are scored
    truncated: bool = False

    @property
    def completion_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def render(tokenizer, prompt: Text, completion: Text) -> tuple[str, str, bool]:
    """(prompt text, completion text, whether a chat template produced them)."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt, completion, False
    if getattr(tokenizer, "chat_template", None) is None:
        raise TokenizationError("conversational data needs a tokenizer with a chat template "
                                "(set tokenizer.chat_template, or convert the data to prompt/chosen/rejected text)")
    p_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    c_msgs = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    prompt_text = tokenizer.apply_chat_template(p_msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(p_msgs + c_msgs, tokenize=False)
    if not full.startswith(prompt_text):
        raise TokenizationError("the chat template renders the prompt differently on its own than as the "
                                "start of the conversation; cannot find the completion's boundary")
    return prompt_text, full[len(prompt_text):], True


def tokenize(tokenizer, prompt: Text, completion: Text, *, max_length: int | None = None,
             max_prompt_length: int | None = None, add_eos: bool = True) -> Tokenized:
    prompt_text, completion_text, templated = render(tokenizer, prompt, completion)
    # A template already writes BOS (and its own turn terminators): adding special tokens again
    # would double BOS, a silent quality loss.
    enc = tokenizer(prompt_text + completion_text, add_special_tokens=not templated,
                    return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    boundary = len(prompt_text)
    prompt_len = 0
    # The scan stops at the first completion token, so special tokens a post-processor appends
    # (offset (0, 0)) after it stay in the completion.
    while prompt_len < len(ids) and offsets[prompt_len][1] <= boundary:
        prompt_len += 1
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids, prompt_len = ids[1:], prompt_len - 1
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None:
        tail = ids[max(prompt_len, len(ids) - 3):]
        if eos not in tail:
            ids.append(eos)
    if prompt_len >= len(ids):
        raise TokenizationError("the completion produced no tokens")
    return truncate(Tokenized(ids, prompt_len), max_length, max_prompt_length, bos)


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
    return Tokenized(prompt + completion, len(prompt), truncated=True)


def tokenize_pair(tokenizer, pair: PreferencePair, **kw) -> tuple[Tokenized, Tokenized]:
    return tokenize(tokenizer, pair.prompt, pair.chosen, **kw), tokenize(tokenizer, pair.prompt, pair.rejected, **kw)
