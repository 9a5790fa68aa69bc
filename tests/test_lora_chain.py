"""A LoRA run started from another LoRA run's final/ (iterative DPO, PPO after DPO) saves an adapter
that, loaded, is the whole chain: the first run's training is not dropped."""

import torch
from peft import PeftModel

from prefalign.models.load import load_model
from prefalign.train.methods import make_config
from prefalign.train.run import train


def _dpo(model, data, out):
    cfg = make_config(method="dpo", model=str(model), data=str(data), output=str(out), max_steps=3, batch_size=8,
                      learning_rate=5e-2, lora={"r": 4}, seed=0, kl_every=0, lr_schedule="constant")
    train(cfg, log=lambda _: None, progress=False)
    return out / "final"


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_chained_lora_run_loads_as_the_whole_chain(tiny_models, pair_file, tmp_path):
    base = tiny_models["llama"]
    first = _dpo(base, pair_file, tmp_path / "r1")
    second = _dpo(first, pair_file, tmp_path / "r2")
    loaded = _weights(load_model(second))
    chained = _weights(PeftModel.from_pretrained(load_model(first), str(second)).merge_and_unload())
    dropped = _weights(PeftModel.from_pretrained(load_model(base), str(second)).merge_and_unload())
    assert loaded.keys() == chained.keys()
    assert all(torch.equal(loaded[k], chained[k]) for k in loaded)
    # what PEFT records by itself: the second adapter on the root model, the first run's training lost
    assert max((loaded[k] - dropped[k]).abs().max().item() for k in loaded) > 1e-3
