"""`prefalign eval`: does the aligned model prefer what people prefer, at what KL, and what did it forget?

Everything asked for runs batched and lands in OUT/eval.json (keys below, spelled as scripts read
them), OUT/eval.md (a table) and OUT/samples.jsonl (every generation, for reading).

  preference_accuracy   held-out pairs ranked right: for a policy with a reference, the implicit
                        reward log pi/pi_ref(chosen) > log pi/pi_ref(rejected); for a reward model,
                        score(chosen) > score(rejected); with neither, the log-prob ranking
  preference_margin     mean of that difference (nats; score units for a reward model)
  reward_mean/_std/_ci95  the judge's score of one sampled completion per held-out prompt
  win_rate, win_rate_ci95 against the baseline's (default: the reference's) completion of the same
                        prompt: wins 1, ties 1/2; a pairwise judge is asked in both orders
  kl_per_sequence       exact KL(policy || reference) of the next-token distributions summed over
                        each sampled completion, averaged over completions
  kl_per_token          the same total KL over the total completion tokens
  kl_distribution       what that KL is of: softmax(logits / T) at the sampling temperature, both
                        models tempered alike; with top_k/top_p set the KL is not computed (it would
                        not be the KL of what was sampled) and this says why
  perplexity(_reference)  exp(mean NLL) of held-out text under the model (and the reference)
  entropy               mean per-token entropy of the policy on its own samples
  distinct_1, distinct_2, mean_length (completion tokens)
  suites/<name>/score   share of suite items answered right (greedy); safety adds refusal_rate and
                        over_refusal_rate; with a reference, suites/<name>/score_reference too
  suites/lm-eval/<task>/score  lm-evaluation-harness's score of a task (eval/harness.py), the same
                        for the reference
Intervals are 95% percentile bootstraps over prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from ..config import Runtime, Sampling, dump_config
from ..data import ReadOptions, load_prompts, load_records
from ..data.batches import collate, tokenize_records
from ..data.records import PreferencePair, UnpairedExample, text_of
from ..errors import ConfigError
from ..judges import PairwiseJudge, make_judge
from ..judges.suites import load_suite, score_suite, suite_prompts
from ..models import perplexity as ppl
from ..models.backends import check_backend, make_generator
from ..models.generate import encode_prompt
from ..models.hub import adapter_base, resolve_model
from ..models.kl import kl_distribution, kl_refusal, rollouts_kl
from ..models.load import load_model, load_tokenizer_for
from ..models.logps import batch_logps, completion_logps
from ..models.scalar import is_reward_model, load_scalar_model, sequence_scores
from ..runtime.device import set_up
from ..runtime.precision import autocast_for
from . import harness, metrics


class EvalConfig(Runtime, Sampling):
    """`prefalign eval`: what a model is scored on and how completions are sampled."""

    model: str = Field(..., description="model folder or LoRA run's final/")
    output: str = Field(..., description="folder for eval.json and samples")
    reference: str | None = Field(None, description="the KL reference; default: the base of an adapter folder")
    baseline: str | None = Field(None, description="the win-rate opponent; default: the reference")
    data: str | None = Field(None, description="held-out pairs (preference accuracy)")
    prompts: str | None = Field(None, description="held-out prompts; default: the prompts of `data`")
    text: str | None = Field(None, description="JSONL of held-out text for perplexity: {text}, {prompt, completion} "
                             "or {prompt, chosen}; default: prompt + chosen of `data`")
    judge: str | None = Field(None, description="reward callable, reward-model folder or pairwise LM judge")
    suites: list[str] = Field([], description="retention suites (eval/suites)")
    max_prompts: int | None = Field(256, ge=1, description="prompts sampled at most")
    max_new_tokens: int = Field(64, ge=0, description="tokens sampled per completion at most")
    batch_size: int = Field(16, ge=1, description="sequences per forward pass")
    max_length: int = Field(512, ge=2, description="prompt + answer tokens kept")
    max_prompt_length: int = Field(256, ge=1, description="prompt tokens kept (the end is kept)")
    format: str = Field("auto", description="data shape of `data` / `prompts`")
    trust_remote_code: bool = Field(False, description="run the model folder's own code (only if you trust it)")
    logits_chunk_mb: float = Field(128.0, gt=0, description="memory per chunk of output-head logits")
    lm_eval: list[str] = Field([], description="lm-evaluation-harness tasks (comma list or list), scored for the "
                               "model and its reference (extra: prefalign[lmeval])")
    lm_eval_include: list[str] = Field([], description="folders of your own lm-eval task YAMLs")
    lm_eval_limit: int | None = Field(None, ge=1, description="the first N items of each lm-eval task only: a quick "
                                      "check, not comparable to published numbers")
    lm_eval_num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per lm-eval prompt; default: "
                                            "each task's own")

    @field_validator("lm_eval", "lm_eval_include", mode="before")
    @classmethod
    def _comma_list(cls, v):
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v


def default_reference(model: str) -> str | None:
    return adapter_base(resolve_model(model, tokenizer_only=True))  # an adapter's base (a Hub id: at its commit)


class Evaluator:
    def __init__(self, cfg: EvalConfig, progress=None):
        self.cfg, self.progress = cfg, progress
        self.device = set_up(cfg)
        check_backend(cfg.generation_backend, self.device)  # before any model is loaded
        self.autocast = autocast_for(cfg.precision, self.device)
        self.generators: dict[int, Any] = {}  # one per model sampled from (policy, baseline)
        self.tokenizer = load_tokenizer_for(cfg.model, cfg.trust_remote_code, cfg.chat_template)
        self.is_reward = is_reward_model(cfg.model)
        load = dict(trust_remote_code=cfg.trust_remote_code, device=self.device)
        if self.is_reward:
            self.model = load_scalar_model(cfg.model, pad_token_id=self.tokenizer.pad_token_id, **load).eval()
        else:
            self.model = load_model(cfg.model, **load).eval()
        self.reference_path = cfg.reference or (None if self.is_reward else default_reference(cfg.model))
        self.reference = None  # evaluated against itself (the base of a study), one copy serves both
        if self.reference_path:
            self.reference = (
                self.model if self.reference_path == cfg.model else load_model(self.reference_path, **load).eval()
            )
        # what each model is called on the server (generation_backend: openai): its path, or served_model
        self.names = {id(self.model): cfg.served_model or cfg.model}
        if self.reference is not None and self.reference is not self.model:
            self.names[id(self.reference)] = self.reference_path
        self.results: dict[str, Any] = {"model": cfg.model, "reference": self.reference_path}
        self.samples: list[dict] = []

    def _task(self, name: str, total: int):
        return self.progress.add_task(name, total=total) if self.progress is not None else None

    def _advance(self, task, n: int = 1) -> None:
        if task is not None:
            self.progress.advance(task, n)

    # ------------------------------------------------------------ preference accuracy
    @torch.no_grad()
    def preference(self) -> None:
        cfg = self.cfg
        records, problems = load_records(cfg.data, ReadOptions(format=cfg.format))
        data = tokenize_records(self.tokenizer, records, max_length=cfg.max_length,
                                max_prompt_length=cfg.max_prompt_length, unit="pairs")
        task = self._task("preference accuracy", len(data))
        diffs: list[float] = []
        kind = "score" if self.is_reward else "implicit_reward" if self.reference is not None else "logprob"
        for i in range(0, len(data), cfg.batch_size):
            idx = list(range(i, min(i + cfg.batch_size, len(data))))
            batch = {k: v.to(self.device) for k, v in
                     collate([data.examples[j] for j in idx], idx, self.tokenizer.pad_token_id).items()}
            b = len(idx)
            with self.autocast():
                if self.is_reward:
                    s = sequence_scores(self.model, batch["input_ids"], batch["attention_mask"])
                else:
                    s = batch_logps(self.model, batch, cfg.logits_chunk_mb)
                    if self.reference is not None:
                        s = s - batch_logps(self.reference, batch, cfg.logits_chunk_mb)
            diffs += (s[:b] - s[b:]).float().tolist()
            self._advance(task, b)
        right = [1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs]
        self.results.update({"preference_accuracy": sum(right) / len(right),
                             "preference_accuracy_ci95": metrics.bootstrap_ci(right, seed=cfg.seed),
                             "preference_margin": sum(diffs) / len(diffs), "preference_kind": kind,
                             "preference_pairs": len(diffs), "preference_problems": len(problems) + len(data.problems)})

    # ------------------------------------------------------------ generations: reward, win rate, KL
    def _prompts(self) -> list:
        prompts, _ = load_prompts(self.cfg.prompts or self.cfg.data, ReadOptions(format=self.cfg.format))
        return prompts[:self.cfg.max_prompts] if self.cfg.max_prompts else prompts

    def _sample(self, model, prompts: list, name: str, greedy: bool = False, max_new_tokens: int | None = None):
        """One completion per prompt (seeded per batch, so two models see the same random draws)."""

        cfg = self.cfg
        sampling = Sampling(max_new_tokens=max_new_tokens or cfg.max_new_tokens,
                            temperature=0.0 if greedy else cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        task = self._task(name, len(prompts))
        rolls = []
        for b, i in enumerate(range(0, len(prompts), cfg.batch_size)):
            chunk = prompts[i:i + cfg.batch_size]
            ids = [encode_prompt(self.tokenizer, p, cfg.max_prompt_length) for p in chunk]
            rolls.append(self._generator(model)(ids, sampling, seed=cfg.seed * 1_000_003 + b,
                                                prompt_texts=[text_of(p) for p in chunk]))
            self._advance(task, len(chunk))
        return rolls

    def _generator(self, model):
        cfg = self.cfg
        if id(model) not in self.generators:
            name = self.names[id(model)]
            remote = cfg.generation_backend == "openai"
            self.generators[id(model)] = make_generator(
                cfg.generation_backend, name if remote else model, self.tokenizer, self.device, self.autocast,
                seed=cfg.seed, max_length=cfg.max_prompt_length + cfg.max_new_tokens,
                memory_fraction=cfg.vllm_memory_fraction, remote=cfg, served_model=name)
        return self.generators[id(model)]

    def generations(self) -> None:
        cfg = self.cfg
        prompts = self._prompts()
        rolls = self._sample(self.model, prompts, "sampling (policy)")
        texts = [t for r in rolls for t in r.completion_texts]
        lengths = [int(n) for r in rolls for n in r.completion_mask.sum(-1)]
        sampling = Sampling.of(cfg)
        task = self._task("exact KL and entropy", len(prompts))
        advance = lambda n: self._advance(task, n)  # noqa: E731
        kl_seq = []
        if self.reference is not None and kl_refusal(sampling) is None:
            # the KL of the distribution that was sampled: both tempered by the same T
            out = rollouts_kl(self.model, self.reference, rolls, temperature=cfg.temperature,
                              chunk_mb=cfg.logits_chunk_mb, advance=advance)
            kl_seq, tokens, entropy_sum = out["kl_seq"], out["tokens"], out["entropy_sum"]
        else:
            tokens, entropy_sum = 0, 0.0
            with torch.no_grad():
                for r in rolls:
                    out = completion_logps(self.model, r.input_ids, r.attention_mask, r.n_prompt, r.completion_mask,
                                           chunk_mb=cfg.logits_chunk_mb, temperature=max(cfg.temperature, 1e-6),
                                           entropy=True)
                    entropy_sum += float(out["entropy"].sum())
                    tokens += int(r.completion_mask.sum())
                    advance(len(r.completion_texts))
        self.results.update({"prompts": len(prompts), "mean_length": sum(lengths) / len(lengths),
                             "entropy": entropy_sum / max(tokens, 1), "distinct_1": metrics.distinct_n(texts, 1),
                             "distinct_2": metrics.distinct_n(texts, 2)})
        if self.reference is not None:
            self.results["kl_distribution"] = kl_distribution(sampling)
        if kl_seq:
            self.results.update(
                {"kl_per_sequence": sum(kl_seq) / len(kl_seq), "kl_per_token": sum(kl_seq) / max(tokens, 1)}
            )
        self.samples = [
            {"prompt": p, "completion": t, "tokens": n} for p, t, n in zip(prompts, texts, lengths, strict=True)
        ]
        if cfg.judge:
            self._judged(prompts, texts)

    def _judged(self, prompts: list, texts: list[str]) -> None:
        cfg = self.cfg
        judge = make_judge(cfg.judge, self.device, pairwise_ok=True)
        self.results["judge"] = judge.kind
        if not isinstance(judge, PairwiseJudge):
            scores = judge.score(prompts, texts)
            mean, std = metrics.mean_std(scores)
            self.results.update(
                {"reward_mean": mean, "reward_std": std, "reward_ci95": metrics.bootstrap_ci(scores, seed=cfg.seed)}
            )
            for s, row in zip(scores, self.samples, strict=True):
                row["reward"] = s
        opponent_path = cfg.baseline or self.reference_path
        if opponent_path is None:
            return
        if opponent_path == cfg.model:  # the same model under the same seeds samples the same completions
            theirs = list(texts)
        else:
            opponent = (
                self.reference
                if opponent_path == self.reference_path
                else load_model(opponent_path, device=self.device)
            )
            self.names.setdefault(id(opponent), opponent_path)
            theirs = [t for r in self._sample(opponent, prompts, "sampling (baseline)") for t in r.completion_texts]
        if isinstance(judge, PairwiseJudge):
            p, agree = judge.compare(prompts, texts, theirs)
            results = [1.0 if x > 0.5 else 0.0 if x < 0.5 else 0.5 for x in p.tolist()]
            self.results["judge_order_agreement"] = float(agree.float().mean())
        else:
            baseline_scores = judge.score(prompts, theirs)
            results = metrics.outcomes(scores, baseline_scores)
            self.results["reward_mean_baseline"] = sum(baseline_scores) / len(baseline_scores)
        rate, ci = metrics.win_rate(results, seed=cfg.seed)
        self.results.update({"win_rate": rate, "win_rate_ci95": ci, "win_rate_baseline": opponent_path})
        for row, theirs_text, o in zip(self.samples, theirs, results, strict=True):
            row.update({"baseline_completion": theirs_text, "outcome": o})

    # ------------------------------------------------------------ retention
    @torch.no_grad()
    def perplexity(self) -> None:
        cfg = self.cfg
        if cfg.text:
            pieces = ppl.text_pieces(cfg.text)
        else:
            records, _ = load_records(cfg.data, ReadOptions(format=cfg.format))
            pieces = [(r.prompt, r.chosen if isinstance(r, PreferencePair) else r.completion) for r in records
                      if isinstance(r, PreferencePair) or (isinstance(r, UnpairedExample) and r.label)]
        seqs, _ = ppl.tokenize_pieces(self.tokenizer, pieces, cfg.max_length, cfg.max_prompt_length)
        # the reference is the model (evaluated against itself): the same figure, not computed twice
        other = self.reference is not None and self.reference is not self.model
        models = {"model": self.model, **({"reference": self.reference} if other else {})}
        task = self._task("perplexity", len(seqs) * len(models))
        nll = {name: ppl.total_nll(model, seqs, self.tokenizer.pad_token_id, self.device, batch_size=cfg.batch_size,
                               chunk_mb=cfg.logits_chunk_mb, autocast=self.autocast,
                               advance=lambda n: self._advance(task, n)) for name, model in models.items()}
        tokens = nll["model"][1]
        self.results.update({"perplexity": ppl.perplexity(*nll["model"]), "perplexity_tokens": tokens})
        if self.reference is not None:
            self.results["perplexity_reference"] = ppl.perplexity(*nll.get("reference", nll["model"]))

    # ------------------------------------------------------------ suites
    def suites(self) -> None:
        for spec in self.cfg.suites:
            suite, items = load_suite(spec)
            prompts = suite_prompts(suite, items, self.tokenizer)
            for who, model in (("", self.model), ("_reference", self.reference)):
                if model is None:
                    continue
                if model is self.model and who:  # the reference is the model: same greedy answers
                    for key in [k for k in self.results if k.startswith(f"suites/{suite.name}/")]:
                        self.results[f"{key}{who}"] = self.results[key]
                    continue
                rolls = self._sample(model, prompts, f"suite {suite.name}{who.replace('_', ' ')}", greedy=True,
                                     max_new_tokens=suite.max_new_tokens)
                answers = [t for r in rolls for t in r.completion_texts]
                for key, value in score_suite(suite, items, answers).items():
                    self.results[f"suites/{suite.name}/{key}{who}"] = value

    def lm_eval(self, manager) -> None:
        cfg = self.cfg

        def run(model) -> dict:
            with self.autocast():
                return harness.run(model, self.tokenizer, cfg.lm_eval, manager, batch_size=cfg.batch_size,
                                   limit=cfg.lm_eval_limit, num_fewshot=cfg.lm_eval_num_fewshot)

        mine = run(self.model)
        # the reference is the model (evaluated against itself): the same scores, not computed twice
        theirs = None if self.reference is None else mine if self.reference is self.model else run(self.reference)
        for who, scored in (("", mine), ("_reference", theirs)):
            for task, values in (scored or {}).items():
                for key, value in values.items():
                    name = f"suites/lm-eval/{task}/{key}"
                    self.results[name if key == "metric" else name + who] = value  # the metric's name: one key


def evaluate(cfg: EvalConfig, log=print, progress: bool = True) -> dict:
    if not (cfg.data or cfg.prompts or cfg.text or cfg.suites or cfg.lm_eval):
        raise ConfigError("nothing to evaluate: give --data, --prompts, --text, --suite or --lm-eval")
    # lm-eval's tasks are found before any model is loaded: a missing extra or task fails in seconds
    manager = harness.task_manager(cfg.lm_eval, cfg.lm_eval_include) if cfg.lm_eval else None
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "eval_config.yaml")
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), disable=not progress)
    with bar:
        ev = Evaluator(cfg, bar)
        if ev.is_reward and (cfg.prompts or cfg.suites or cfg.judge or cfg.lm_eval):
            raise ConfigError(f"{cfg.model} is a reward model: it is evaluated on --data pairs only")
        if cfg.data:
            ev.preference()
        if not ev.is_reward and (cfg.prompts or cfg.data):
            ev.generations()
        if not ev.is_reward and (cfg.text or cfg.data):
            ev.perplexity()
        if cfg.suites:
            ev.suites()
    if manager is not None:  # after the bar: the harness draws its own progress
        ev.lm_eval(manager)
    results = ev.results
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    (out / "eval.md").write_text(markdown(results))
    if ev.samples:
        (out / "samples.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in ev.samples))
    log(f"eval -> {out / 'eval.json'}, {out / 'eval.md'}")
    return results


def _fmt(value: Any) -> str:
    if isinstance(value, dict):  # lm-eval's metrics of a task
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"[{value[0]:.4g}, {value[1]:.4g}]"
    return str(value)


def markdown(results: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(v)} |" for k, v in results.items()]
    return "\n".join(lines) + "\n"
