"""The bench's PPO workload: iterations of the real trainer, `prefalign.train.ppo.run_rl`.

Not a stand-in: the trainer's rollout (sampling with the KV cache, the reward, the no-grad pass
for old log-probs, entropy and values, the reference pass, GAE) and its update (`ppo_epochs` x
`num_minibatches` clipped policy + value steps, RLConfig's defaults) run as `prefalign train
method=ppo` runs them, full fine-tune with a frozen reference copy and a value head. Times come
from the run's metrics.jsonl (`step_seconds` = `ppo/rollout_seconds` + `ppo/update_seconds`), with
the warm-up iterations dropped. FLOPs come from the shapes of the rollouts the trainer actually
sampled (flops.ppo_iteration_flops), recorded by wrapping the trainer's `generate`.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..models import backends
from ..models.generate import encode_prompt
from ..models.hub import resolve_model
from ..models.load import load_tokenizer_for
from ..models.tiny import build_tokenizer
from ..train.methods import PPO
from ..train.ppo import run_rl
from .flops import head_params, matmul_params, ppo_iteration_flops
from .shapes import build

# single-token words of the bench tokenizer: prompts of `length` words are `length` tokens long
WORDS = "the movie was great good bad plot actor story film scene end love hate fine awful".split()


def bench_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """The bench's reward (a `module:function` callable, as users give one): cheap and
    deterministic, so the timed work is the trainer's and not a judge's."""
    return [len(c) / 100.0 for c in completions]


def save_shape(shape, path: str | Path) -> str:
    """A random-init shape as a model folder run_rl can load, with a small word-level BPE tokenizer
    whose ids are a subset of the model's vocabulary (sampled ids beyond it decode to nothing).
    Seeded as the other workloads seed their model (torch.manual_seed(0) before building)."""

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(400)]
    torch.manual_seed(0)
    model = build(shape, None, torch.device("cpu"))
    tok = build_tokenizer(corpus, vocab_size=min(400, model.config.vocab_size), chat=False)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return str(path)


def _save_in_child(shape, path: Path) -> str:
    # building and saving the model in this process would raise its RSS high-water mark, which
    # cannot be reset; a child process keeps this workload's peak the trainer's own
    code = (
        "import json, sys; from prefalign.bench.rl import save_shape; save_shape(json.loads(sys.argv[1]), sys.argv[2])"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(shape), str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"could not write the {shape} model folder:\n{proc.stderr[-2000:]}")
    return str(path)


def write_prompts(tokenizer, n: int, length: int, path: Path, seed: int = 0) -> list[int]:
    """n distinct prompts of `length` words; returns their token lengths as the trainer encodes them
    (with the bench tokenizer, exactly `length` each)."""

    one = [w for w in WORDS if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1] or WORDS
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(one) for _ in range(length)) for _ in range(n)]
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return [len(encode_prompt(tokenizer, t)) for t in texts]


@contextmanager
def recorded_rollouts():
    """Yields a list that receives the shape of every rollout run_rl samples: rows, prompt width,
    the completion columns generation produced, scored tokens, real tokens. metrics.jsonl logs the
    mean completion length but not the columns generated (every row runs until the last one stops),
    which the FLOP count needs."""

    inner, shapes = backends.generate, []

    def recording(*args, **kwargs):
        roll = inner(*args, **kwargs)
        shapes.append({"rows": int(roll.input_ids.shape[0]), "prompt": int(roll.n_prompt),
                       "generated": int(roll.completion_mask.shape[1]), "scored": int(roll.completion_mask.sum()),
                       "tokens": int(roll.attention_mask.sum())})
        return roll

    backends.generate = recording  # the hf backend's generate: every rollout run_rl samples
    try:
        yield shapes
    finally:
        backends.generate = inner


def model_counts(model_dir: str) -> dict[str, int]:
    """N (matmul weights), the head's weights and the hidden size of a model folder, from its config
    on the meta device (no weights loaded)."""

    cfg = AutoConfig.from_pretrained(str(resolve_model(model_dir, tokenizer_only=True)), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {"params_matmul": matmul_params(model), "params_head": head_params(model),
            "params_total": sum(p.numel() for p in model.parameters()),
            "hidden": model.config.get_text_config().hidden_size}


def bench_config(model_dir, prompts, output, *, batch: int, new_tokens: int, max_steps: int, **kw):
    """The run the bench times. RLConfig's defaults for everything that shapes an iteration
    (ppo_epochs, num_minibatches, the value head, the KL penalty, the reference); set here only what
    a benchmark must fix. The KL monitor is off (kl_every 0): it is a run-level measurement on its
    own prompts between iterations, not part of an iteration."""

    return PPO(**{"model": str(model_dir), "output": str(output), "prompts": str(prompts),
                       "reward": f"{__name__}:bench_reward", "batch_size": batch, "max_new_tokens": new_tokens,
                       "max_steps": max_steps, "learning_rate": 1e-6, "lr_schedule": "constant", "seed": 0,
                       "kl_every": 0, **kw})


def ppo_workload(spec: dict, precision: str, peak_flops: float, peak_memory) -> dict:
    """spec: shape | model, batch (prompts per rollout), seq (prompt + new tokens), new_tokens (default
    seq/2), steps, warmup, device, logits_chunk_mb. Returns the workload's result row."""

    b, seq = spec["batch"], spec["seq"]
    new = spec.get("new_tokens", seq // 2)
    steps, warmup = spec.get("steps", 5), spec.get("warmup", 2)
    with tempfile.TemporaryDirectory(prefix="prefalign-bench-ppo-") as tmp:
        tmp = Path(tmp)
        model_dir = spec.get("model") or _save_in_child(spec.get("shape", "tiny"), tmp / "model")
        prompt_lengths = write_prompts(load_tokenizer_for(model_dir), b, seq - new, tmp / "prompts.jsonl")
        cfg = bench_config(model_dir, tmp / "prompts.jsonl", tmp / "run", batch=b, new_tokens=new,
                           max_steps=warmup + steps, precision=precision, device=spec.get("device", "auto"),
                           logits_chunk_mb=spec.get("logits_chunk_mb", 128.0),
                           max_prompt_length=max(seq, max(prompt_lengths)))
        with recorded_rollouts() as shapes:
            run_rl(cfg, log=lambda msg: print(msg, file=sys.stderr), progress=False)
        metrics = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines() if x]
        summary = json.loads((tmp / "run" / "run.json").read_text())
        counts = model_counts(model_dir)
    timed = [m for m in metrics if m["step"] > warmup]
    if len(timed) != steps or len(shapes) != warmup + steps:
        raise RuntimeError(
            f"expected {warmup + steps} PPO iterations, got {len(metrics)} logged, {len(shapes)} sampled"
        )
    timed_shapes = [shapes[m["step"] - 1] for m in timed]
    flops = [ppo_iteration_flops(counts["params_matmul"], counts["params_head"], counts["hidden"],
                                 rows=s["rows"], prompt=s["prompt"], generated=s["generated"], scored=s["scored"],
                                 epochs=cfg.ppo_epochs) for s in timed_shapes]
    step_s = [m["step_seconds"] for m in timed]
    rollout_s, update_s = [m["ppo/rollout_seconds"] for m in timed], [m["ppo/update_seconds"] for m in timed]
    med, med_r, med_u = statistics.median(step_s), statistics.median(rollout_s), statistics.median(update_s)
    mean = {k: statistics.mean(f[k] for f in flops) for k in flops[0]}
    tokens = statistics.mean(s["tokens"] for s in timed_shapes)  # real prompt + completion tokens, as training logs
    return {
        "trainer": "prefalign.train.ppo.run_rl", "ppo_epochs": cfg.ppo_epochs, "num_minibatches": cfg.num_minibatches,
        "kl_penalty": getattr(cfg, "kl_penalty", None), "critic": cfg.critic, "reference": summary["reference"],
        "model_copies": summary["model_copies"], "new_tokens": new, "prompt_tokens": prompt_lengths,
        **counts, "rollouts": timed_shapes, "step_seconds": step_s, "rollout_seconds": rollout_s,
        "update_seconds": update_s, "warmup_steps_excluded": warmup,
        "step_seconds_median": med, "step_seconds_min": min(step_s), "step_seconds_max": max(step_s),
        "rollout_seconds_median": med_r, "update_seconds_median": med_u,
        "tokens_per_step": tokens, "tokens_per_s": tokens / med,
        "flops_per_step": mean["total"], "flops_parts": mean, "achieved_flops": mean["total"] / med,
        "mfu": mean["total"] / med / peak_flops, "mfu_rollout": mean["rollout"] / med_r / peak_flops,
        "mfu_update": mean["update"] / med_u / peak_flops, "peak_memory_bytes": peak_memory(),
    }
