"""Judges: what says how good a completion is. PPO's reward, `prefalign label`'s labeller, eval's scorer.

- a Python callable `module:function` or `path/to/file.py:function`, called as
  f(prompts: list[str], completions: list[str]) -> list[float] (a sentiment analyser, a unit-test
  runner, a regex: ground truth that drives PPO);
- a reward model folder or Hub id (a one-label sequence-classification model, e.g. `prefalign train --method reward`);
- a pairwise LLM judge: any causal LM (a folder or a Hub id) asked which of two answers is better, scored from its
  next-token probabilities of the two choice letters, asked in both orders to cancel position bias.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.batches import pad
from ..data.records import Text, text_of
from ..data.tokenize import tokenize
from ..errors import JudgeError, ScoringError
from ..models.generate import encode_prompt, left_pad
from ..models.hub import resolve_model
from ..models.load import load_model, load_tokenizer
from ..models.scalar import is_reward_model, load_scalar_model, sequence_scores


def load_callable(spec: str) -> Callable:
    """`package.module:function` (importable) or `file.py:function` (a path)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise JudgeError(f"reward {spec!r}: expected MODULE:FUNCTION, FILE.py:FUNCTION or a reward-model folder")
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise JudgeError(f"reward {spec!r}: no such file {path}")
        mod_name = f"prefalign_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise JudgeError(f"reward {spec!r}: cannot import {target}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise JudgeError(f"reward {spec!r}: {target} has no function {name!r}")
    return fn


class CallableJudge:
    kind = "callable"

    def __init__(self, spec: str):
        self.spec, self.fn = spec, load_callable(spec)

    def score(self, prompts: list[Text], completions: list[str]) -> list[float]:
        values = list(self.fn([text_of(p) for p in prompts], list(completions)))
        if len(values) != len(completions):
            raise ScoringError(f"reward {self.spec}: returned {len(values)} scores for {len(completions)} completions")
        return [float(v) for v in values]


class RewardModelJudge:
    kind = "reward_model"

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", batch_size: int = 16,
                 max_length: int = 1024):
        self.model_path = str(path)
        self.tokenizer = load_tokenizer(path)
        self.model = load_scalar_model(path, pad_token_id=self.tokenizer.pad_token_id, device=device).eval()
        self.model.requires_grad_(False)
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    def shares_vocab(self, tokenizer) -> bool:
        return tokenizer.get_vocab() == self.tokenizer.get_vocab()

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores of token ids as they are (a rollout whose policy shares this tokenizer)."""

        out = []
        for i in range(0, len(input_ids), self.batch_size):
            sl = slice(i, i + self.batch_size)
            out.append(sequence_scores(self.model, input_ids[sl].to(self.device), attention_mask[sl].to(self.device)))
        return torch.cat(out).cpu()

    def score(self, prompts: list[Text], completions: list[str]) -> list[float]:
        """Text in: tokenized exactly as reward-model training tokenized it (joint, EOS appended)."""

        seqs = [tokenize(self.tokenizer, p, c if c.strip() else " ", max_length=self.max_length)
                for p, c in zip(prompts, completions, strict=True)]
        batch = pad(seqs, self.tokenizer.pad_token_id)
        return self.score_ids(batch["input_ids"], batch["attention_mask"]).tolist()


JUDGE_TEMPLATE = ("Which response is the better answer to the request?\n\nRequest: {prompt}\n\n"
                  "Response A: {a}\n\nResponse B: {b}\n\nAnswer with the letter of the better response.")


class PairwiseJudge:
    """P(A better than B) from a causal LM's next-token distribution restricted to the two letters.

    Asked in both orders: p = (P(first | a, b) + P(second | b, a)) / 2, which cancels a constant
    preference for a position; `agreement` says whether the two orders picked the same answer."""

    kind = "pairwise"

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", template: str = JUDGE_TEMPLATE,
                 choices: tuple[str, str] = ("A", "B"), batch_size: int = 8, max_length: int = 1024):
        self.tokenizer = load_tokenizer(path)
        self.model = load_model(path, device=device).eval()
        self.model.requires_grad_(False)
        self.template, self.device, self.batch_size, self.max_length = template, device, batch_size, max_length
        self.choice_ids = [self._letter_id(c) for c in choices]

    def _letter_id(self, letter: str) -> int:
        # the letter as it follows the prompt: " A" for a plain prompt, "A" after a chat template's newline
        lead = "" if getattr(self.tokenizer, "chat_template", None) else " "
        ids = self.tokenizer(lead + letter, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise JudgeError(f"judge tokenizer splits {lead + letter!r} into {len(ids)} tokens; pick other choices")
        return ids[0]

    def prompt_ids(self, prompt: Text, a: str, b: str) -> list[int]:
        text = self.template.format(prompt=text_of(prompt), a=a, b=b)
        if getattr(self.tokenizer, "chat_template", None):
            return encode_prompt(self.tokenizer, [{"role": "user", "content": text}], self.max_length)
        return encode_prompt(self.tokenizer, text + " The better response is", self.max_length)

    @torch.no_grad()
    def first_probs(self, items: list[tuple[Text, str, str]]) -> torch.Tensor:
        """P(the first letter) for each (prompt, a, b), from the two letters' logits only."""

        out = []
        for i in range(0, len(items), self.batch_size):
            ids, mask = left_pad([self.prompt_ids(*x) for x in items[i:i + self.batch_size]],
                                 self.tokenizer.pad_token_id)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=position_ids.to(self.device)).logits[:, -1].float()  # (b, V)
            out.append(torch.softmax(logits[:, self.choice_ids], -1)[:, 0].cpu())
        return torch.cat(out)

    def compare(self, prompts: list[Text], a: list[str], b: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(a better than b), agreement of the two orders) per item."""
        forward = self.first_probs(list(zip(prompts, a, b, strict=True)))
        swapped = self.first_probs(list(zip(prompts, b, a, strict=True)))
        return combine_orders(forward, swapped)


def combine_orders(p_forward: torch.Tensor, p_swapped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p_forward = P(first | a, b), p_swapped = P(first | b, a) -> (P(a better), whether both orders
    agree). A judge that always says 'first' with probability q gets (q + 1 - q)/2 = 1/2: no opinion."""
    p = (p_forward + (1 - p_swapped)) / 2
    agree = (p_forward > 0.5) == (p_swapped < 0.5)
    return p, agree


def make_judge(spec: str, device: torch.device | str = "cpu", *, pairwise_ok: bool = False):
    """A reward-model folder, a causal-LM folder (pairwise judge, where allowed) or a callable."""

    path = resolve_model(spec, tokenizer_only=True)  # a Hub id: its snapshot, configs only until loaded
    if path.is_dir():
        if is_reward_model(path):
            return RewardModelJudge(spec, device)
        if pairwise_ok and (path / "config.json").exists():
            return PairwiseJudge(spec, device)
        raise JudgeError(f"{spec}: not a reward model (a one-label sequence-classification folder)"
                         + ("" if pairwise_ok else "; a causal LM can only judge pairs (prefalign label)"))
    return CallableJudge(spec)
