"""Each method trains tiny GPT-2, Llama and Mamba models to >= 0.9 reward accuracy on a learnable set."""

import json

import pytest

from conftest import learnable_pairs, unpaired_from, write_jsonl
from prefalign.train.config import TrainConfig
from prefalign.train.offline import run_offline

SETTINGS = {  # per method: what converges in a few dozen CPU steps on the toy set
    "dpo": dict(beta=0.5, learning_rate=3e-3),
    "ipo": dict(beta=0.5, learning_rate=3e-3),
    "simpo": dict(beta=2.0, gamma=0.3, learning_rate=3e-3),
    "orpo": dict(beta=4.0, learning_rate=5e-3),
    "kto": dict(beta=0.5, learning_rate=3e-3),
}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mamba"])
@pytest.mark.parametrize("method", list(SETTINGS))
def test_method_reaches_reward_accuracy(method, arch, tiny_models, tmp_path):
    rows = learnable_pairs(48)
    data = write_jsonl(tmp_path / "d.jsonl", unpaired_from(rows) if method == "kto" else rows)
    cfg = TrainConfig(method=method, model=str(tiny_models[arch]), data=str(data), eval_data=str(data),
                      output=str(tmp_path / "run"), max_steps=60, batch_size=8, eval_every=60, seed=0,
                      lr_schedule="constant", **SETTINGS[method])
    run_offline(cfg, log=lambda _: None, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0], lines[-1]
    assert first["step"] == 0 and first["eval/rewards/accuracy"] <= 0.75, first  # untrained: cannot rank it
    assert last["eval/rewards/accuracy"] >= 0.9, last
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
