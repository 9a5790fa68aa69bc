"""The pairwise LM judge on an OpenAI-compatible server (`prefalign label` with generation_backend: openai).

The same question as the in-process PairwiseJudge (JUDGE_TEMPLATE, both orders, combine_orders), and
P(first letter) read from the server's log-probabilities:
- a model without a chat template (the server answers a chat request with 400): the prompt as the
  in-process judge writes it ("... The better response is"), sent twice with " A" and " B" appended,
  scored with `echo` + `logprobs` and `max_tokens: 0` (the prompt tokens' log-probs and nothing
  generated: OpenAI's legacy API, vLLM and prefalign serve answer so), the letter being the last
  token. (With max_tokens 1 a server appends the generated token, unless it was EOS, which it leaves
  out: the letter's position would depend on what the model says next.) P(A) = softmax(log p(" A"),
  log p(" B")), what the in-process judge computes from the two letters' logits
  (tests/test_remote_generation.py: equal to 1e-5);
- a chat model: one chat completion of one token with `top_logprobs: 20`; a letter's log-prob is the
  log-sum-exp over the listed tokens that are that letter up to white space ("A", " A", "A\n": one
  answer, several spellings; `letter_logprobs`). A letter missing from the top 20 is given the 20th
  log-prob (an upper bound); with neither letter listed, the judge's greedy answer is parsed (a rubric
  verdict: "A" -> 1, "B" -> 0, anything else 1/2).
"""

from __future__ import annotations

import math
import re

import torch

from ..data.records import Text, text_of
from ..errors import ScoringError
from ..models.remote import check_served, openai_client, served_models
from . import JUDGE_TEMPLATE, combine_orders


class RemotePairwiseJudge:
    kind = "pairwise"

    def __init__(self, name: str, base_url: str, api_key_env: str, template: str = JUDGE_TEMPLATE,
                 choices: tuple[str, str] = ("A", "B")):
        self.client, self.name, self.base_url = openai_client(base_url, api_key_env), name, base_url
        check_served(name, served_models(self.client, base_url), base_url)
        self.template, self.choices = template, choices
        self.chat: bool | None = None  # found out on the first question

    def _text(self, prompt: Text, a: str, b: str) -> str:
        return self.template.format(prompt=text_of(prompt), a=a, b=b)

    def _plain(self, text: str) -> float:
        prompt = text + " The better response is"
        lps = self.last_token_logprobs([f"{prompt} {c}" for c in self.choices])
        return 1 / (1 + math.exp(lps[1] - lps[0]))

    def last_token_logprobs(self, prompts: list[str]) -> list[float]:
        """log p(each prompt's last token | the tokens before it), scored by the server (echo, nothing
        generated: the echoed tokens are the prompt's own, whatever the model would say next)."""
        out = self.client.completions.create(model=self.name, prompt=prompts, max_tokens=0, echo=True, logprobs=0,
                                             temperature=0)
        lps = []
        for choice in sorted(out.choices, key=lambda c: c.index):
            tokens = choice.logprobs.tokens if choice.logprobs else None
            if not tokens or len(tokens) < 2 or choice.logprobs.token_logprobs[-1] is None:
                raise ScoringError(f"{self.base_url}: no prompt log-probs returned with echo for judge {self.name}")
            lps.append(choice.logprobs.token_logprobs[-1])
        return lps

    def _chat(self, text: str) -> float:
        import openai  # present: openai_client checked it

        try:
            out = self.client.chat.completions.create(model=self.name, messages=[{"role": "user", "content": text}],
                                                      max_tokens=1, temperature=0, logprobs=True, top_logprobs=20)
        except openai.BadRequestError:
            if self.chat is None:  # no chat template: ask as the in-process judge asks a plain model
                self.chat = False
                return self._plain(text)
            raise
        self.chat = True
        content = out.choices[0].logprobs.content if out.choices[0].logprobs else None
        listed = [(t.token, t.logprob) for t in content[0].top_logprobs] if content else []
        top = letter_logprobs(listed, self.choices)
        if not top:
            return self._verdict(text)
        floor = min(lp for _, lp in listed)
        a, b = (top.get(c, floor) for c in self.choices)
        return 1 / (1 + math.exp(b - a))

    def _verdict(self, text: str) -> float:
        out = self.client.chat.completions.create(model=self.name, messages=[{"role": "user", "content": text}],
                                                  max_tokens=8, temperature=0)
        found = re.search(rf"\b({'|'.join(map(re.escape, self.choices))})\b", out.choices[0].message.content or "")
        return 0.5 if not found else 1.0 if found.group(1) == self.choices[0] else 0.0

    def first_probs(self, items: list[tuple[Text, str, str]]) -> torch.Tensor:
        ask = self._plain if self.chat is False else self._chat
        out = []
        for item in items:
            out.append(ask(self._text(*item)))
            ask = self._plain if self.chat is False else self._chat
        return torch.tensor(out)

    def compare(self, prompts: list[Text], a: list[str], b: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        forward = self.first_probs(list(zip(prompts, a, b, strict=True)))
        swapped = self.first_probs(list(zip(prompts, b, a, strict=True)))
        return combine_orders(forward, swapped)


def letter_logprobs(top: list[tuple[str, float]], choices: tuple[str, ...]) -> dict[str, float]:
    """{choice: log p} from a top-logprobs list: a choice's log-prob is the log-sum-exp over the listed
    tokens equal to it up to white space (" A" and "A" are the same answer: their probabilities add).
    Choices no token spells are left out."""
    out: dict[str, float] = {}
    for token, lp in top:
        key = token.strip()
        if key in choices:
            out[key] = lp if key not in out else max(out[key], lp) + math.log1p(math.exp(-abs(out[key] - lp)))
    return out
