"""`prefalign eval` end to end on tiny models, and the exact KL against a brute-force computation."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import learnable_pairs, write_jsonl
from prefalign.config import Sampling
from prefalign.eval.evaluate import EvalConfig, evaluate

REWARDS = Path(__file__).parent / "fixtures" / "rewards.py"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_exact_kl_equals_full_logits_brute_force(temperature, tiny_models, tokenizer):
    from transformers import AutoModelForCausalLM

    from prefalign.models.generate import encode_prompt, generate
    from prefalign.models.logps import completion_kl

    p = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    q = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    with torch.no_grad():
        for w in q.parameters():
            w.add_(0.05 * torch.randn_like(w))
    ids = [encode_prompt(tokenizer, t) for t in ["I loved it", "the plot was", "what"]]
    roll = generate(p, tokenizer, ids, Sampling(max_new_tokens=6, temperature=temperature), seed=0)
    out = completion_kl(p, q, roll.input_ids, roll.attention_mask, roll.n_prompt, roll.completion_mask, chunk_mb=0.001,
                        temperature=temperature)
    with torch.no_grad():
        for i, prompt in enumerate(ids):
            comp = roll.completion_ids[i][roll.completion_mask[i].bool()]
            seq = torch.cat([torch.tensor(prompt), comp])[None]
            # the distributions that were sampled: softmax(logits / T) for both
            lp = torch.log_softmax(p(seq).logits[0, len(prompt) - 1:-1] / temperature, -1)
            lq = torch.log_softmax(q(seq).logits[0, len(prompt) - 1:-1] / temperature, -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)
            assert torch.allclose(out["kl"][i, :len(comp)], kl, atol=1e-5)
            assert (kl > 0).all()


def test_kl_is_refused_when_sampling_truncates(tiny_models, pair_file, tmp_path):
    res = evaluate(EvalConfig(model=str(tiny_models["gpt2"]), reference=str(tiny_models["llama"]), data=str(pair_file),
                              output=str(tmp_path / "e"), max_new_tokens=4, max_prompts=4, top_k=5),
                   log=lambda _: None, progress=False)
    assert "kl_per_sequence" not in res and res["kl_distribution"].startswith("not computed: top_k=5")
    res = evaluate(EvalConfig(model=str(tiny_models["gpt2"]), reference=str(tiny_models["gpt2"]), data=str(pair_file),
                              output=str(tmp_path / "t"), max_new_tokens=4, max_prompts=4, temperature=0.5),
                   log=lambda _: None, progress=False)
    assert res["kl_distribution"] == "softmax(logits / 0.5)" and "kl_per_sequence" in res


def test_a_model_against_itself(tiny_models, pair_file, tmp_path):
    """Everything relative to the reference is exactly neutral when the reference is the model."""
    import shutil

    model = str(tiny_models["gpt2"])
    reference = shutil.copytree(model, tmp_path / "same-weights")  # another folder: every metric is computed
    res = evaluate(EvalConfig(model=model, reference=str(reference), data=str(pair_file), judge=f"{REWARDS}:length",
                              suites=["arithmetic"], output=str(tmp_path / "e"), max_new_tokens=8, max_prompts=12,
                              batch_size=5), log=lambda _: None, progress=False)
    assert res["preference_accuracy"] == 0.5 and res["preference_margin"] == 0.0  # every pair a tie
    assert res["kl_per_sequence"] == pytest.approx(0.0, abs=1e-6)
    assert res["win_rate"] == 0.5  # same seeds, same model: the same completions, all ties
    assert res["perplexity"] == pytest.approx(res["perplexity_reference"])
    assert res["suites/arithmetic/score"] == res["suites/arithmetic/score_reference"]
    saved = json.loads((tmp_path / "e" / "eval.json").read_text())
    for key in ("preference_accuracy", "reward_mean", "reward_ci95", "win_rate", "win_rate_ci95", "kl_per_sequence",
                "kl_per_token", "perplexity", "perplexity_reference", "mean_length", "suites/arithmetic/score"):
        assert key in saved, key
    lo, hi = saved["reward_ci95"]
    assert lo <= saved["reward_mean"] <= hi
    assert (tmp_path / "e" / "eval.md").read_text().startswith("| metric | value |")
    # given as the same folder, one loaded copy serves as both and the same results come out
    same = evaluate(EvalConfig(model=model, reference=model, data=str(pair_file), judge=f"{REWARDS}:length",
                               suites=["arithmetic"], output=str(tmp_path / "e2"), max_new_tokens=8, max_prompts=12,
                               batch_size=5), log=lambda _: None, progress=False)
    for key in ("preference_accuracy", "kl_per_sequence", "win_rate", "perplexity", "perplexity_reference",
                "suites/arithmetic/score_reference", "reward_mean"):
        assert same[key] == pytest.approx(res[key], abs=1e-6), key
    assert len((tmp_path / "e" / "samples.jsonl").read_text().splitlines()) == 12


def test_a_dpo_model_prefers_what_the_data_prefers(tiny_models, tmp_path):
    from prefalign.train.methods import make_config
    from prefalign.train.run import train

    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(48))
    train(
        make_config(
            method="dpo",
            model=str(tiny_models["llama"]),
            data=str(data),
            output=str(tmp_path / "dpo"),
            max_steps=40,
            batch_size=8,
            learning_rate=3e-3,
            beta=0.5,
            lora=True,
            lr_schedule="constant",
        ),
        log=lambda _: None,
        progress=False,
    )
    run = subprocess.run([sys.executable, "-m", "prefalign", "eval", "--model", tmp_path / "dpo" / "final",
                          "--data", data, "--suite", "safety", "-o", tmp_path / "e", "max_new_tokens=6",
                          "max_prompts=16", "--no-progress"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert res["reference"] == str(tiny_models["llama"])  # the adapter folder's base, found by itself
    assert res["preference_kind"] == "implicit_reward" and res["preference_accuracy"] >= 0.9
    assert res["kl_per_sequence"] > 0 and res["kl_per_token"] > 0
    assert 0 <= res["suites/safety/refusal_rate"] <= 1 and "suites/safety/over_refusal_rate" in res
    assert "| `preference_accuracy` |" in run.stdout


def test_a_reward_model_is_scored_on_pairs(tiny_models, tokenizer, pair_file, tmp_path):
    from prefalign.models.scalar import load_scalar_model

    rm = load_scalar_model(tiny_models["llama"], pad_token_id=tokenizer.pad_token_id)
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    res = evaluate(EvalConfig(model=str(tmp_path / "rm"), data=str(pair_file), output=str(tmp_path / "e")),
                   log=lambda _: None, progress=False)
    assert res["preference_kind"] == "score" and res["preference_accuracy"] == 0.5  # a zero head: all ties
    with pytest.raises(ValueError, match="reward model"):
        evaluate(EvalConfig(model=str(tmp_path / "rm"), data=str(pair_file), suites=["safety"],
                            output=str(tmp_path / "e2")), log=lambda _: None, progress=False)


def test_perplexity_is_exp_mean_nll_by_brute_force_and_the_guards_is_the_same(tiny_models, tokenizer, tmp_path):
    """eval's perplexity on {text} and {prompt, completion} rows (batches of 2, so rows are padded) equals
    exp(mean NLL) of the scored tokens computed row by row from full logits, every row's first token left
    out (nothing before it); a training guard measures the same figure on the same text (models/perplexity.py)."""
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM

    from prefalign.data.tokenize import tokenize
    from prefalign.train.guards import Retention
    from prefalign.train.methods import make_config

    rows = [{"text": "the movie was good and the plot was fun"}, {"text": "bad"},
            {"prompt": "I hated the film", "completion": " because it was long and dull"}]
    text = write_jsonl(tmp_path / "text.jsonl", rows)
    res = evaluate(EvalConfig(model=str(tiny_models["llama"]), text=str(text), output=str(tmp_path / "e"),
                              batch_size=2), log=lambda _: None, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            seq = tokenize(tokenizer, r.get("prompt", ""), r.get("text", r.get("completion")))
            lp = torch.log_softmax(model(torch.tensor([seq.input_ids])).logits[0].double(), -1)
            for t in range(1, len(seq.input_ids)):
                if seq.loss_mask[t]:
                    nll, count = nll - float(lp[t - 1, seq.input_ids[t]]), count + 1
    assert res["perplexity_tokens"] == count and res["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    cfg = make_config(model=str(tiny_models["llama"]), data=str(text), output=str(tmp_path / "o"), guard_every=1,
                      guards={"text": str(text)})
    guard = Retention(cfg, tokenizer, "cpu", nullcontext, batch_size=2).measure(model)["perplexity"]
    assert guard == pytest.approx(res["perplexity"], rel=1e-9)
