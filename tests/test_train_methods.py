"""Each method trains tiny GPT-2, Llama and Mamba models to >= 0.9 reward accuracy on held-out pairs of a
learnable task (prompts not seen in training)."""

import json

import pytest

from conftest import held_out_pairs, learnable_pairs, unpaired_from, write_jsonl
from prefalign.train.methods import make_config
from prefalign.train.run import train

SETTINGS = {  # per method: what converges in a few dozen CPU steps on the toy set
    "dpo": dict(beta=0.5, learning_rate=3e-3),
    "ipo": dict(beta=0.5, learning_rate=5e-3),  # 3e-3: Mamba at 0.78 held out after 100 steps
    "simpo": dict(beta=2.0, simpo_gamma=0.3, learning_rate=3e-3),
    "orpo": dict(beta=4.0, learning_rate=5e-3),
    "kto": dict(beta=0.5, learning_rate=3e-3),
}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mamba"])
@pytest.mark.parametrize("method", list(SETTINGS))
def test_method_reaches_reward_accuracy(method, arch, tiny_models, tmp_path):
    rows = learnable_pairs(96)  # 48 pairs: memorised by Mamba (train 1.0, held-out 0.6); 96 generalise
    # KTO: both answers of every pair (alternating ones would show it only praise after "loved"/"hated")
    data = write_jsonl(tmp_path / "d.jsonl", unpaired_from(rows, both=True) if method == "kto" else rows)
    held = held_out_pairs(rows)
    # measured: Mamba at 60 steps is still at 0.6 held out; KTO on Mamba needs 150 (0.69 at 100)
    steps = (150 if method == "kto" else 100) if arch == "mamba" else 60
    held_out = write_jsonl(tmp_path / "h.jsonl", unpaired_from(held, both=True) if method == "kto" else held)
    cfg = make_config(method=method, model=str(tiny_models[arch]), data=str(data), eval_data=str(held_out),
                      output=str(tmp_path / "run"), max_steps=steps, batch_size=8, eval_every=steps, seed=0, kl_every=0,
                      lr_schedule="constant", **SETTINGS[method])
    train(cfg, log=lambda _: None, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0], lines[-1]
    assert first["step"] == 0
    if method != "kto":  # the untrained model's own log-prob ranking (implicit rewards are all 0 there)
        assert first["eval/logps/accuracy"] <= 0.75, first
    assert last["eval/rewards/accuracy"] >= 0.9, last
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
