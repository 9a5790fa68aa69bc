"""Where completions are sampled: `generation_backend: hf | vllm | openai` (openai: models/remote.py).

`hf`: transformers' `generate` on the model being trained (models/generate.py): the policy itself
samples, so there is nothing to keep in sync.

`vllm`: a vLLM engine colocated on the training GPU (an optional extra, CUDA/ROCm only). It holds its
own copy of the weights in a share of the GPU's memory (`vllm_memory_fraction`), sleeps (weights
offloaded, KV cache freed) while the trainer updates, and wakes for the next rollout; after each
update the new weights are pushed to it: a LoRA policy's adapter only (saved and attached as a new
LoRA request), a full fine-tune's weights loaded into the engine's model. Both backends return the
same `Rollout` (the exact sampled ids), so rewards, log-probs and KLs are computed the same way.

**Not yet run**: no GPU (and so no vLLM) has been lent to this project; this backend is written
against vLLM's offline API (LLM, SamplingParams, LoRARequest, sleep/wake_up) and is untested. On a
machine without vLLM or without a GPU, choosing it is an error naming what is missing, before any
model is loaded (tested).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
import weakref
from contextlib import nullcontext
from pathlib import Path

import torch

from ..config import Sampling
from ..errors import ConfigError
from .generate import Rollout, eos_ids, generate, rollout_from_ids
from .load import is_peft
from .remote import OpenAIGenerator, remote_eos


def backend_problem(backend: str, device: torch.device) -> str | None:
    """What this machine lacks for `backend`, or None."""
    if backend == "openai":
        found = importlib.util.find_spec("openai") is not None
        return None if found else "the openai package (pip install 'prefalign[openai]')"
    if backend != "vllm":
        return None
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("the vllm package (pip install 'prefalign[vllm]', with the torch build vLLM requires)")
    if device.type != "cuda":
        missing.append(f"a CUDA or ROCm GPU (this run's device is {device.type})")
    return " and ".join(missing) or None


def check_backend(backend: str, device: torch.device) -> None:
    if problem := backend_problem(backend, device):
        raise ConfigError(f"generation_backend: {backend} needs {problem}; use generation_backend: hf")


class HFGenerator:
    """transformers' generate on the live model."""

    def __init__(self, model, tokenizer, device: torch.device, autocast=nullcontext):
        self.model, self.tokenizer, self.device, self.autocast = model, tokenizer, device, autocast

    def __call__(self, prompts: list[list[int]], sampling: Sampling, *, seed: int | None = None,
                 prompt_texts: list[str] | None = None) -> Rollout:
        return generate(self.model, self.tokenizer, prompts, sampling, seed=seed, device=self.device,
                        autocast=self.autocast, prompt_texts=prompt_texts)

    def push(self, model) -> None:
        self.model = model  # the model samples itself: nothing to copy


def make_generator(backend: str, model, tokenizer, device: torch.device, autocast=nullcontext, *,
                   seed: int = 0, max_length: int = 2048, memory_fraction: float = 0.3, lora_rank: int | None = None,
                   remote: Sampling | None = None, served_model: str | None = None, log=print):
    """The generator for `backend`. For vllm, `model` must be the weights the engine starts from (for
    a LoRA run: the base, before adapters are added; `lora_rank` then enables adapter pushes). For
    openai, `remote` holds base_url and api_key_env, `served_model` the server's name for the model,
    and `model` is the local folder (its tokenizer and generation config; no weights are loaded)."""
    if backend == "hf":
        return HFGenerator(model, tokenizer, device, autocast)
    check_backend(backend, device)
    if backend == "openai":
        return OpenAIGenerator(tokenizer, device, base_url=remote.base_url, api_key_env=remote.api_key_env,
                               model=served_model, eos=remote_eos(tokenizer, model), log=log)
    return VLLMGenerator(model, tokenizer, device, seed=seed, max_length=max_length, memory_fraction=memory_fraction,
                         lora_rank=lora_rank)


class VLLMGenerator:
    """A colocated vLLM engine; see the module docstring (not yet run on a GPU)."""

    def __init__(self, model, tokenizer, device: torch.device, *, seed: int, max_length: int, memory_fraction: float,
                 lora_rank: int | None):
        from vllm import LLM  # optional extra, present only where the backend is chosen

        # the engine in this process, not a worker process: updated weights can be loaded into it
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.dir = Path(tempfile.mkdtemp(prefix="prefalign-vllm-"))
        weakref.finalize(self, shutil.rmtree, self.dir, True)  # the engine's copy of the weights goes with it
        model.save_pretrained(self.dir / "base", safe_serialization=True)
        tokenizer.save_pretrained(self.dir / "base")
        dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(model.dtype, "float32")
        lora = {"enable_lora": True, "max_lora_rank": engine_lora_rank(lora_rank)} if lora_rank else {}
        self.llm = LLM(model=str(self.dir / "base"), dtype=dtype, seed=seed, max_model_len=max_length,
                       gpu_memory_utilization=memory_fraction, enable_sleep_mode=True, **lora)
        self.tokenizer, self.eos, self.device = tokenizer, eos_ids(tokenizer, model), device
        self.lora_request, self.version, self.pending = None, 0, None
        self.llm.sleep(level=1)

    def push(self, model) -> None:
        """After an update: a LoRA policy's adapter is saved and attached as the next LoRA request;
        a full fine-tune's weights are loaded into the engine when it next wakes."""
        self.version += 1
        if is_peft(model):
            from vllm.lora.request import LoRARequest  # optional extra

            path = self.dir / f"adapter-{self.version}"
            model.save_pretrained(str(path), safe_serialization=True)
            shutil.rmtree(self.dir / f"adapter-{self.version - 2}", ignore_errors=True)
            self.lora_request = LoRARequest(f"policy-{self.version}", self.version, str(path))
        else:
            self.pending = model

    def __call__(self, prompts: list[list[int]], sampling: Sampling, *, seed: int | None = None,
                 prompt_texts: list[str] | None = None) -> Rollout:
        from vllm import SamplingParams  # optional extra

        if sampling.max_new_tokens < 1:
            raise ConfigError("generation_backend: vllm samples at least one token: max_new_tokens must be >= 1")
        self.llm.wake_up()
        if self.pending is not None:
            _engine_model(self.llm).load_weights((n, p.detach()) for n, p in self.pending.state_dict().items())
            self.pending = None
        # one seed per request: k samples of one prompt must differ; unseeded, the draw comes from
        # torch's RNG, which a checkpoint saves, so a resumed run samples what the first would
        base = seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,)))
        params = [SamplingParams(n=1, temperature=sampling.temperature, top_k=sampling.top_k or -1,
                                 top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, seed=base + i,
                                 stop_token_ids=self.eos, detokenize=False) for i in range(len(prompts))]
        t0 = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                 lora_request=self.lora_request, use_tqdm=False)
        seconds = time.perf_counter() - t0
        self.llm.sleep(level=1)  # the trainer gets the memory back for the update
        return self._rollout(prompts, outs, seconds, prompt_texts)

    def _rollout(self, prompts, outs, seconds: float, prompt_texts) -> Rollout:
        sampled = [(list(o.outputs[0].token_ids), _stop_token(o.outputs[0], self.tokenizer)) for o in outs]
        return rollout_from_ids(prompts, sampled, self.tokenizer, self.eos, self.device, seconds, prompt_texts)


def _stop_token(out, tokenizer) -> int | None:
    """The EOS a vLLM completion stopped on (stop_reason: one of stop_token_ids; None with finish
    reason "stop": the model's own EOS), or None when it ran out of tokens."""
    if out.finish_reason != "stop":
        return None
    return out.stop_reason if isinstance(out.stop_reason, int) else tokenizer.eos_token_id


# the adapter ranks a vLLM engine can be built for (its LoRA config's choices); an adapter of a smaller
# rank fits in the next one up
ENGINE_LORA_RANKS = (8, 16, 32, 64, 128, 256)


def engine_lora_rank(r: int) -> int:
    fits = [k for k in ENGINE_LORA_RANKS if k >= r]
    if not fits:
        raise ConfigError(f"generation_backend: vllm takes LoRA ranks up to {ENGINE_LORA_RANKS[-1]}, not {r}")
    return fits[0]


def _engine_model(llm):
    """The engine's torch model (to load updated weights into), where vLLM keeps it in-process."""
    executor = llm.llm_engine.model_executor
    worker = getattr(executor.driver_worker, "worker", executor.driver_worker)
    return worker.model_runner.model
