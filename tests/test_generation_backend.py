"""generation_backend: hf | vllm. vLLM is an optional GPU extra: where it cannot run, choosing it is
an error naming what is missing, before any model loads. The rollout a backend's token lists make is
laid out exactly as hf's own (the vLLM engine itself is not yet run: no GPU here)."""

import json

import pytest
import torch

from conftest import write_jsonl
from prefalign.config import Sampling
from prefalign.errors import ConfigError
from prefalign.models.backends import HFGenerator, backend_problem, engine_lora_rank, rollout_from_ids
from prefalign.models.generate import eos_ids
from prefalign.models.load import load_model

NEEDS = "generation_backend: vllm needs the vllm package .* and a CUDA or ROCm GPU \\(this run's device is cpu\\)"


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"I watched film {i}"} for i in range(4)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_vllm_where_it_cannot_run_stops_before_any_work(tiny_models, prompts, tmp_path):
    from prefalign.eval.evaluate import EvalConfig, Evaluator
    from prefalign.feedback.sample import SampleConfig, sample
    from prefalign.train.methods import make_config
    from prefalign.train.run import train

    model = str(tiny_models["llama"])
    assert backend_problem("hf", torch.device("cpu")) is None
    with pytest.raises(ConfigError, match=NEEDS):
        sample(SampleConfig(model=model, prompts=str(prompts), output=str(tmp_path / "s.jsonl"),
                            generation_backend="vllm"))
    assert not (tmp_path / "s.jsonl").exists()
    cfg = make_config(method="grpo", model=model, prompts=str(prompts), reward="prefalign.judges.sentiment:positive",
                      output=str(tmp_path / "rl"), generation_backend="vllm")
    with pytest.raises(ConfigError, match=NEEDS):
        train(cfg, progress=False)
    assert not (tmp_path / "rl" / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match=NEEDS):
        Evaluator(EvalConfig(model=model, prompts=str(prompts), output=str(tmp_path / "ev"), generation_backend="vllm"))


def test_adapter_ranks_fit_the_engines_choices():
    assert [engine_lora_rank(r) for r in (1, 4, 8, 12, 64, 200)] == [8, 8, 8, 16, 64, 256]
    with pytest.raises(ConfigError, match="LoRA ranks up to 256"):
        engine_lora_rank(300)


def test_a_backends_token_lists_make_hfs_rollout(tiny_models, tokenizer):
    """Sample with hf, hand its completions back as a backend returns them (token lists cut after EOS,
    some without the EOS they stopped on), and the rollout is the same tensors."""
    model = load_model(tiny_models["llama"])
    # 30 more stop tokens, so that some of 6 random completions of 12 tokens stop and some do not
    eos = sorted(set(eos_ids(tokenizer, model)) | set(range(10, 40)))
    model.generation_config.eos_token_id = eos
    prompts = [tokenizer("I loved it")["input_ids"], tokenizer("the plot was")["input_ids"]] * 3
    sampling = Sampling(max_new_tokens=12, temperature=3.0)  # hot: some end on EOS, some run out
    hf = HFGenerator(model, tokenizer, torch.device("cpu"))(prompts, sampling, seed=5)
    sampled = []
    for i, (c, m) in enumerate(zip(hf.completion_ids, hf.completion_mask, strict=True)):
        ids = c[m.bool()].tolist()
        stop = ids[-1] if bool(hf.ended[i]) else None
        sampled.append((ids[:-1] if stop is not None and i % 2 else ids, stop))
    stops = [s is not None for _, s in sampled]
    assert any(stops) and not all(stops), "the draw must mix both endings"
    other = rollout_from_ids(prompts, sampled, tokenizer, eos, torch.device("cpu"), 1.0, hf.prompt_texts)
    width = hf.input_ids.shape[1]
    assert other.n_prompt == hf.n_prompt
    assert torch.equal(other.input_ids[:, :width], hf.input_ids)
    assert torch.equal(other.attention_mask[:, :width], hf.attention_mask)
    assert torch.equal(other.ended, hf.ended) and other.completion_texts == hf.completion_texts
    assert json.dumps(other.prompt_texts) == json.dumps(hf.prompt_texts)


@pytest.mark.skipif(backend_problem("vllm", torch.device("cuda")) is not None or not torch.cuda.is_available(),
                    reason="needs vLLM and a GPU (run on a GPU machine with `pip install 'prefalign[vllm]'`)")
def test_vllm_and_hf_sample_the_same_distribution(tiny_models, tokenizer):
    """Same prompts, same settings, 64 samples each: the two backends' completions have the same mean
    log-probability under the model and the same length, within sampling noise (4 standard errors)."""
    from prefalign.models.backends import make_generator
    from prefalign.models.logps import completion_logps

    device = torch.device("cuda")
    model = load_model(tiny_models["llama"], device=device)
    prompts = [tokenizer("I loved it")["input_ids"], tokenizer("the plot was")["input_ids"]] * 32
    sampling = Sampling(max_new_tokens=8, temperature=1.0)
    stats = {}
    for backend in ("hf", "vllm"):
        roll = make_generator(backend, model, tokenizer, device, seed=0, max_length=64)(prompts, sampling, seed=1)
        with torch.no_grad():
            lp = completion_logps(model, roll.input_ids, roll.attention_mask, roll.n_prompt,
                                  roll.completion_mask)["logps"]
        per_seq = (lp * roll.completion_mask).sum(-1) / roll.completion_mask.sum(-1)
        stats[backend] = (per_seq.mean(), per_seq.std() / len(per_seq) ** 0.5, roll.completion_mask.sum(-1).float())
    (m_hf, se_hf, len_hf), (m_v, se_v, len_v) = stats["hf"], stats["vllm"]
    assert abs(m_hf - m_v) < 4 * (se_hf**2 + se_v**2) ** 0.5, (m_hf, m_v)
    assert abs(len_hf.mean() - len_v.mean()) < 4 * ((len_hf.var() + len_v.var()) / len(prompts)) ** 0.5
