"""SFT (completion-only loss) and reward models (Bradley-Terry on a scalar head) on the one loop."""

import json

import pytest
import torch

from conftest import held_out_pairs, learnable_pairs, write_jsonl
from prefalign.train.methods import make_config
from prefalign.train.run import train


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_sft_learns_the_demonstrations_and_ignores_the_prompt(tiny_models, tmp_path):
    rows = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in learnable_pairs(32)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = make_config(method="sft", model=str(tiny_models["llama"]), data=str(data), eval_data=str(data),
                      output=str(tmp_path / "run"), max_steps=40, batch_size=8, learning_rate=3e-3,
                      eval_every=40, lr_schedule="constant")
    train(cfg, log=lambda _: None, progress=False)
    first, last = _metrics(tmp_path / "run")[0], _metrics(tmp_path / "run")[-1]
    assert first["eval/nll/token"] > 4.0  # random init: about log(vocab) = log 400 = 6
    assert last["eval/nll/token"] < 0.3 * first["eval/nll/token"], last  # answers follow from the prompt


def test_sft_loss_is_the_completion_token_mean(tiny_models, tokenizer):
    """The loss equals the NLL of completion tokens only, averaged over all completion tokens."""
    from prefalign.data.batches import collate, tokenize_records
    from prefalign.data.records import UnpairedExample
    from prefalign.models.load import load_model
    from prefalign.train.methods import METHODS
    from prefalign.train.offline import forward_of, make_step

    model = load_model(tiny_models["gpt2"])
    recs = [UnpairedExample("I loved the movie", " it was good.", True),
            UnpairedExample("I hated it", " it was awful and bad.", True),
            UnpairedExample("skip me", " no", False)]
    data = tokenize_records(tokenizer, recs, max_length=64, max_prompt_length=32, unit="completions")
    assert len(data) == 2  # the undesirable completion is not a demonstration
    batch = collate(data.examples, [0, 1], tokenizer.pad_token_id)
    cfg = make_config(method="sft", model="m", data="d", output="o")
    from contextlib import nullcontext
    loss, _, _ = make_step(forward_of(model, cfg), cfg, None, nullcontext)(batch)
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["loss_mask"][:, 1:]
    expected = -(logp * mask).sum() / mask.sum()
    assert abs(float(loss) - float(expected)) < 1e-5
    assert METHODS["sft"].unit == "completions"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reward_model_reaches_accuracy_and_reads_back_with_transformers(arch, tiny_models, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prefalign.models.scalar import load_scalar_model, sequence_scores

    pairs = learnable_pairs(96)  # measured: 48 pairs at 3e-3 reach 1.0 on train but 0.69 held out (GPT-2)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", held_out_pairs(pairs))
    cfg = make_config(method="reward", model=str(tiny_models[arch]), data=str(data), eval_data=str(held_out),
                      output=str(tmp_path / "rm"), max_steps=120, batch_size=8, learning_rate=5e-3, eval_every=120,
                      lr_schedule="constant")
    train(cfg, log=lambda _: None, progress=False)
    rows = _metrics(tmp_path / "rm")
    assert rows[-1]["eval/reward_model/accuracy"] >= 0.9, rows[-1]
    final = tmp_path / "rm" / "final"
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    ours = load_scalar_model(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    eos = tok.eos_token  # as training saw them: completions end with EOS
    texts = [f"I loved the movie it was great.{eos}", f"I loved the movie it was awful.{eos}"]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        a = hf(**enc).logits[:, 0]
        b = sequence_scores(ours, enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(a, b, atol=1e-5)  # pad != eos here, so transformers reads the same token
    assert a[0] > a[1]


def test_reward_model_with_lora_saves_a_standalone_folder(tiny_models, tmp_path):
    from prefalign.models.scalar import is_reward_model

    data = write_jsonl(tmp_path / "pairs.jsonl", [dict(r, margin=1.0) for r in learnable_pairs(16)])
    cfg = make_config(method="reward", model=str(tiny_models["llama"]), data=str(data), output=str(tmp_path / "rm"),
                      max_steps=2, batch_size=4, lora=True, margin_scale=0.5)
    train(cfg, log=lambda _: None, progress=False)
    assert is_reward_model(tmp_path / "rm" / "final")
    assert not (tmp_path / "rm" / "final" / "adapter_config.json").exists()


def test_bradley_terry_hand_values():
    from math import exp, log

    from prefalign.losses.preference import bradley_terry

    loss, m = bradley_terry(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5]))
    assert abs(float(loss[0]) - log(1 + exp(-1.0))) < 1e-6  # -log sigma(1)
    assert abs(float(loss[1]) - log(1 + exp(0.5))) < 1e-6  # -log sigma(-0.5)
    assert m["reward_model/accuracy"].tolist() == [1.0, 0.0]
    loss, _ = bradley_terry(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([3.0]), margin_scale=0.5)
    assert abs(float(loss[0]) - log(1 + exp(0.5))) < 1e-6  # -log sigma(1 - 1.5)
