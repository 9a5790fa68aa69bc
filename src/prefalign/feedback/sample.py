"""`prefalign sample`: n completions per prompt from a model, as JSONL a judge can label."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import Field

from ..config import Runtime, Sampling
from ..data import ReadOptions, load_prompts
from ..errors import DataError
from ..models.backends import check_backend, make_generator
from ..models.generate import encode_prompt
from ..models.load import load_model, load_tokenizer_for
from ..runtime.device import set_up
from ..runtime.precision import autocast_for


class SamplingRun(Runtime, Sampling):
    """What `sample` and `iterate` share: the prompts, how many completions, how they are sampled."""

    prompts: str = Field(..., description="prompt file (or any preference file: its prompts)")
    n: int = Field(4, ge=1, description="completions per prompt")
    max_new_tokens: int = Field(64, ge=0, description="tokens sampled per completion at most")
    max_prompts: int | None = Field(None, ge=1, description="prompts used at most")


class SampleConfig(SamplingRun):
    """`prefalign sample`: n completions per prompt."""

    model: str = Field(..., description="model folder or LoRA run's final/")
    output: str = Field(..., description="JSONL of {prompt, completions, ended}")
    batch_size: int = Field(16, ge=1, description="rows (prompt x sample) per generate call")
    max_prompt_length: int = Field(256, ge=1, description="prompt tokens kept (the end is kept)")
    format: str = Field("auto", description="data shape of `prompts`")
    trust_remote_code: bool = Field(False, description="run the model folder's own code (only if you trust it)")


def sample(cfg: SampleConfig, log=print, model=None, tokenizer=None) -> dict:
    """Writes one line per prompt: {"prompt", "completions": [n], "ended": [n]}. Reproducible: batch b
    is drawn with seed (seed, b), whatever ran before. `model`/`tokenizer` may be passed in loaded."""

    device = set_up(cfg)
    check_backend(cfg.generation_backend, device)  # before any model is loaded
    tokenizer = tokenizer or load_tokenizer_for(cfg.model, cfg.trust_remote_code, cfg.chat_template)
    if cfg.generation_backend == "openai":  # the server samples: only the tokenizer is loaded here
        model = cfg.model
    model = model or load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, device=device)
    gen = make_generator(cfg.generation_backend, model, tokenizer, device, autocast_for(cfg.precision, device),
                         seed=cfg.seed, max_length=cfg.max_prompt_length + cfg.max_new_tokens,
                         memory_fraction=cfg.vllm_memory_fraction, remote=cfg,
                         served_model=cfg.served_model or cfg.model, log=log)
    prompts, problems = load_prompts(cfg.prompts, ReadOptions(format=cfg.format))
    for p in problems[:5]:
        log(f"set aside: {p}")
    prompts = prompts[:cfg.max_prompts] if cfg.max_prompts else prompts
    if not prompts:
        raise DataError(f"{cfg.prompts}: no usable prompts")
    sampling = Sampling.of(cfg)
    rows = [i for i in range(len(prompts)) for _ in range(cfg.n)]
    ids = [encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in prompts]
    texts: list[str] = []
    ended: list[bool] = []
    t0, new_tokens = time.perf_counter(), 0
    for b, start in enumerate(range(0, len(rows), cfg.batch_size)):
        chunk = rows[start:start + cfg.batch_size]
        roll = gen([ids[i] for i in chunk], sampling, seed=cfg.seed * 1_000_003 + b)
        texts += roll.completion_texts
        ended += roll.ended.tolist()
        new_tokens += roll.new_tokens
    seconds = time.perf_counter() - t0
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):
            sl = slice(i * cfg.n, (i + 1) * cfg.n)
            f.write(json.dumps({"prompt": prompt, "completions": texts[sl], "ended": ended[sl]}, ensure_ascii=False)
                    + "\n")
    summary = {"prompts": len(prompts), "completions": len(texts), "new_tokens": new_tokens, "seconds": seconds,
               "tokens_per_s": new_tokens / seconds if seconds else None,
               "eos_rate": sum(ended) / len(ended), "problems": len(problems)}
    log(f"{len(texts)} completions for {len(prompts)} prompts -> {out} ({new_tokens / seconds:.0f} tokens/s)")
    return summary
