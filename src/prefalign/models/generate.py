"""Generation: batched sampling with the model's KV cache, left padding, seeded, timed.

A rollout keeps the exact token ids that were sampled, laid out as generation saw them
([left-padded prompt | completion]); log-probs, values and reward-model scores are computed on those
ids, never on re-tokenized text (decoding and re-encoding is not the identity for BPE, and the
policy would be scored on sequences it never produced).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig

from ..config import Sampling
from ..data.chat import template_of
from ..data.records import Text


@dataclass
class Rollout:
    input_ids: Tensor  # (N, P + Tc) [left-padded prompt | completion, right-padded after EOS]
    attention_mask: Tensor  # (N, P + Tc) 1 on real prompt and completion tokens
    n_prompt: int  # P: the completion starts at this column in every row
    completion_mask: Tensor  # (N, Tc) 1 up to and including the first EOS
    ended: Tensor  # (N,) bool: the completion reached EOS within max_new_tokens
    seconds: float
    prompt_texts: list[str]
    completion_texts: list[str]

    @property
    def completion_ids(self) -> Tensor:
        return self.input_ids[:, self.n_prompt:]

    @property
    def new_tokens(self) -> int:
        return int(self.completion_mask.sum())

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else float("nan")

    def select(self, rows: Tensor) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows],
                "completion_mask": self.completion_mask[rows]}


def encode_prompt(tokenizer, prompt: Text, max_prompt_length: int | None = None) -> list[int]:
    """Messages go through the chat template with the generation prompt (the template writes BOS);
    plain text gets the tokenizer's special tokens, as training's tokenization does. Long prompts
    keep their end (what the answer responds to)."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        template_of(tokenizer)  # none: an error naming chat_template
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        ids = ids[len(ids) - max_prompt_length:]
    return list(ids)


def eos_ids(tokenizer, model) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's generation config's."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def completion_mask(completions: Tensor, eos: list[int]) -> tuple[Tensor, Tensor]:
    """(mask (N, Tc): tokens up to and including the first EOS, ended (N,))."""
    is_eos = torch.isin(completions, torch.tensor(eos, device=completions.device))
    ended = is_eos.any(-1)
    # number of EOS tokens strictly before t == 0  <=>  t is at or before the first EOS
    before = torch.cumsum(is_eos.long(), -1) - is_eos.long()
    return (before == 0).long(), ended


def generation_config(sampling: Sampling, pad_id: int, eos: list[int]):
    """Every sampling setting spelled out. A setting left unset falls back to transformers' defaults
    (top_k=50 among them), and then the samples are not drawn from softmax(logits / T), the
    distribution PPO scores them under: its k1 KL estimate goes negative (seen, and tested)."""

    greedy = sampling.temperature <= 0
    return GenerationConfig(
        do_sample=not greedy, max_new_tokens=sampling.max_new_tokens, min_new_tokens=0, pad_token_id=pad_id,
        eos_token_id=eos or None, use_cache=True, temperature=1.0 if greedy else sampling.temperature,
        top_k=sampling.top_k, top_p=sampling.top_p, min_p=None, typical_p=1.0, repetition_penalty=1.0,
        no_repeat_ngram_size=0, num_beams=1)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    sampling: Sampling,
    *,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    autocast=nullcontext,
    prompt_texts: list[str] | None = None,
) -> Rollout:
    """Sample one completion per prompt id list (repeat a prompt for k samples). With `seed`, the
    draw is reproducible and the global RNG is left as it was; without, it uses (and advances) the
    global RNG, which a checkpoint saves, so a resumed PPO run samples what the first run would."""
    pad = tokenizer.pad_token_id
    eos = eos_ids(tokenizer, model)
    ids, mask = left_pad(prompts, pad)
    ids, mask = ids.to(device), mask.to(device)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    # a seeded draw must leave every generator as it found it: manual_seed also seeds the GPUs'
    # generators, which a CPU-only fork would leave reset (a later PPO rollout would replay them)
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    rng = torch.random.fork_rng(devices=gpus) if seed is not None else nullcontext()
    with rng, autocast():
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask,
                             generation_config=generation_config(sampling, pad, eos))
    seconds = time.perf_counter() - t0
    model.train(was_training)
    return to_rollout(ids, mask, out[:, ids.shape[1]:], tokenizer, eos, seconds, prompts, prompt_texts)


def to_rollout(ids: Tensor, mask: Tensor, completions: Tensor, tokenizer, eos: list[int], seconds: float,
               prompts: list[list[int]], prompt_texts: list[str] | None) -> Rollout:
    """A Rollout from left-padded prompts (ids, mask) and the completions sampled after them (any
    backend), masked after the first EOS and padded there."""
    pad = tokenizer.pad_token_id
    if completions.shape[1] == 0:  # max_new_tokens 0 or nothing generated: one padding column
        completions = torch.full((len(prompts), 1), pad, dtype=torch.long, device=ids.device)
    cmask, ended = completion_mask(completions, eos)
    completions = torch.where(cmask.bool(), completions, torch.full_like(completions, pad))
    texts = [tokenizer.decode(c[m.bool()], skip_special_tokens=True) for c, m in zip(completions, cmask, strict=True)]
    if prompt_texts is None:
        prompt_texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    return Rollout(torch.cat([ids, completions], 1), torch.cat([mask, cmask], 1), ids.shape[1], cmask, ended,
                   seconds, prompt_texts, texts)


def rollout_from_ids(prompts: list[list[int]], sampled: list[tuple[list[int], int | None]], tokenizer,
                     eos: list[int], device: torch.device, seconds: float,
                     prompt_texts: list[str] | None = None) -> Rollout:
    """The Rollout of completions a backend returned as token lists, each with the EOS token it stopped
    on (None: it ran out of tokens): laid out exactly as hf's generate lays out its own
    ([left-padded prompt | completion])."""
    pad = tokenizer.pad_token_id
    rows = []
    for ids, stop in sampled:
        if stop is not None and (not ids or ids[-1] != stop):
            ids = [*ids, stop]  # a backend that leaves out the EOS it stopped on: kept, as hf keeps it
        rows.append(ids)
    completions = torch.full((len(prompts), max(1, max(len(r) for r in rows))), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        completions[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    ids, mask = left_pad(prompts, pad)
    return to_rollout(ids.to(device), mask.to(device), completions.to(device), tokenizer, eos, seconds, prompts,
                      prompt_texts)
