"""Padding-free (packed) batches give the same log-probs, losses and gradients as padded ones."""

import json

import pytest
import torch

from conftest import learnable_pairs, write_jsonl
from prefalign.data.batches import collate, collate_packed, tokenize_records
from prefalign.data.records import PreferencePair
from prefalign.models.load import load_model
from prefalign.models.logps import batch_logps


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("data_kind", ["pairs", "completions"])
def test_packed_equals_padded(arch, data_kind, tiny_models, tokenizer):
    model = load_model(tiny_models[arch])
    rows = learnable_pairs(6)
    rows[0]["chosen"] = " it was great, truly great, the best film of the year and more." * 2  # ragged lengths
    recs = [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    data = tokenize_records(tokenizer, recs, max_length=128, max_prompt_length=64, unit=data_kind)
    idx = list(range(len(data)))
    padded = collate(data.examples, idx, tokenizer.pad_token_id)
    packed = collate_packed(data.examples, idx, tokenizer.pad_token_id)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # fewer positions through the model
    assert int(packed["tokens"]) == int(padded["attention_mask"].sum())
    a = batch_logps(model, padded)
    b = batch_logps(model, packed)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    ga = torch.autograd.grad(a.sum(), [p for p in model.parameters()], allow_unused=True)
    gb = torch.autograd.grad(b.sum(), [p for p in model.parameters()], allow_unused=True)
    for x, y in zip(ga, gb, strict=True):
        if x is not None:
            assert torch.allclose(x, y, atol=1e-4)
    assert torch.equal(padded["lengths"], packed["lengths"])


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_training_with_packing_logs_the_same_losses(method, tiny_models, tmp_path):
    from prefalign.train.methods import make_config
    from prefalign.train.run import train

    data = write_jsonl(tmp_path / "d.jsonl", learnable_pairs(16))
    losses = {}
    for packing in (False, True):
        out = tmp_path / f"run-{packing}"
        reference = {} if method == "sft" else {"reference": "copy"}  # sft has no reference
        train(make_config(method=method, model=str(tiny_models["llama"]), data=str(data), output=str(out),
                          max_steps=3, batch_size=4, learning_rate=1e-3, packing=packing, share_prompt=False,
                          **reference), log=lambda _: None, progress=False)
        losses[packing] = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[False] == pytest.approx(losses[True], abs=1e-5)


def test_packing_is_refused_for_mamba(tiny_models, tmp_path):
    from prefalign.train.methods import make_config
    from prefalign.train.run import train

    data = write_jsonl(tmp_path / "d.jsonl", learnable_pairs(8))
    with pytest.raises(ValueError, match="packing needs .*: mamba has Mamba/SSM layers"):
        train(make_config(method="sft", model=str(tiny_models["mamba"]), data=str(data), output=str(tmp_path / "r"),
                                max_steps=1, packing=True), log=lambda _: None, progress=False)
