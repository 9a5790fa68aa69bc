"""`generation_backend: openai`: completions sampled by an OpenAI-compatible server (prefalign serve, vLLM,
SGLang, llama.cpp's server, TGI), so a model too big for this process is sampled where it is served.

The prompts go as token ids (the local tokenizer encoded them exactly as the in-process backend does,
chat template and truncation included) to `/v1/completions`; the completions come back as token ids
where the server names them (`return_tokens_as_token_ids`, vLLM's extension, which prefalign serve
implements), otherwise their text is re-encoded (not exact for every BPE: said in the log).

Seeds. A batch of rows with seed s:
- prefalign serve (a model it lists with owned_by "prefalign") gets the batch as one request of
  several prompts with seed s, which it draws as transformers' `generate` draws that batch after
  `torch.manual_seed(s)` (serve/jobs.py): the same completions as `generation_backend: hf`.
- any other server gets one request per row with seed s + i (as the vllm backend seeds its rows):
  servers such as vLLM seed every prompt of a request alike, and k samples of one prompt would be
  k copies. Reproducible from the seed, but not the in-process backend's draw.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..config import Sampling
from ..errors import ConfigError, ModelError
from .generate import Rollout, rollout_from_ids


def openai_client(base_url: str, api_key_env: str, timeout: float = 600.0):
    """The official client (an optional extra), with the key read from `api_key_env`."""
    try:
        import openai  # the openai extra, needed only for this backend
    except ImportError:
        raise ConfigError("generation_backend: openai needs the openai package: pip install 'prefalign[openai]'") \
            from None
    return openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "none", timeout=timeout,
                         max_retries=2)


def served_models(client, base_url: str) -> dict[str, str]:
    """name -> owner of every model the server lists; a server that cannot be reached is a ConfigError."""
    try:
        return {m.id: getattr(m, "owned_by", "") for m in client.models.list()}
    except Exception as e:  # noqa: BLE001  connection refused, 401, ...: the user's setting to fix
        raise ConfigError(f"base_url {base_url}: cannot list the served models: {type(e).__name__}: {e}") from None


def check_served(name: str, served: dict[str, str], base_url: str) -> None:
    if name not in served:
        raise ModelError(f"{base_url} does not serve {name!r} (it serves: {', '.join(served) or 'nothing'}); "
                         "set served_model to one of those")


def remote_eos(tokenizer, folder: str | Path | None) -> list[int]:
    """The ids that end a completion without the weights: the tokenizer's EOS and the folder's
    generation_config.json's (as models/generate.py eos_ids reads them from a loaded model)."""
    ids = {tokenizer.eos_token_id}
    config = Path(folder) / "generation_config.json" if folder else None
    if config is not None and config.exists():
        extra = json.loads(config.read_text()).get("eos_token_id")
        ids.update(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


class OpenAIGenerator:
    """Samples through a server's /v1/completions; returns the same Rollout as the other backends."""

    def __init__(self, tokenizer, device: torch.device, *, base_url: str, api_key_env: str, model: str,
                 eos: list[int], log=print):
        self.client, self.base_url, self.model = openai_client(base_url, api_key_env), base_url, model
        served = served_models(self.client, base_url)
        check_served(model, served, base_url)
        self.batch_seeded = served[model] == "prefalign"
        self.tokenizer, self.device, self.eos, self.log = tokenizer, device, eos, log
        self.reencoded = False

    def push(self, model) -> None:
        raise ConfigError("generation_backend: openai samples a fixed served model; it cannot follow training")

    def __call__(self, prompts: list[list[int]], sampling: Sampling, *, seed: int | None = None,
                 prompt_texts: list[str] | None = None) -> Rollout:
        if sampling.max_new_tokens < 1:
            raise ConfigError("generation_backend: openai samples at least one token: max_new_tokens must be >= 1")
        # unseeded: the seed comes from torch's RNG, so a seeded run's draws stay reproducible
        base = seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,)))
        t0 = time.perf_counter()
        if self.batch_seeded:
            choices = self._request(prompts, sampling, base)
        else:
            with ThreadPoolExecutor(max_workers=min(16, len(prompts))) as pool:  # the server batches them
                choices = [c for cs in pool.map(lambda i: self._request([prompts[i]], sampling, base + i),
                                                range(len(prompts))) for c in cs]
        seconds = time.perf_counter() - t0
        # the EOS a completion stopped on is not in what a server returns: the tokenizer's is put back
        stop = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id in self.eos else self.eos[0]
        sampled = [(self._ids(c), stop if c.finish_reason == "stop" else None) for c in choices]
        return rollout_from_ids(prompts, sampled, self.tokenizer, self.eos, self.device, seconds, prompt_texts)

    def _request(self, prompts: list[list[int]], sampling: Sampling, seed: int) -> list:
        out = self.client.completions.create(
            model=self.model, prompt=prompts, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, n=1, seed=seed, logprobs=0,
            extra_body={"top_k": sampling.top_k, "return_tokens_as_token_ids": True})
        if len(out.choices) != len(prompts):
            raise ModelError(f"{self.base_url}: {len(out.choices)} completions for {len(prompts)} prompts")
        return sorted(out.choices, key=lambda c: c.index)

    def _ids(self, choice) -> list[int]:
        tokens = getattr(choice.logprobs, "tokens", None) if choice.logprobs else None
        if tokens and all(t.startswith("token_id:") for t in tokens):
            return [int(t.removeprefix("token_id:")) for t in tokens]
        if not self.reencoded:
            self.log(f"{self.base_url} returns no token ids: completions re-encoded from their text")
            self.reencoded = True
        return self.tokenizer(choice.text, add_special_tokens=False)["input_ids"]
