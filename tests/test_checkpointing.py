"""gradient_checkpointing: true | selective give the log-probs and gradients of the unchecked path;
the selective policy keeps matmul/attention outputs and recomputes only cheap ops."""

import pytest
import torch

from conftest import learnable_pairs
from prefalign.data.batches import collate, collate_shared_prompt, tokenize_records
from prefalign.data.records import PreferencePair
from prefalign.models.load import add_lora, enable_checkpointing, keep_matmuls, load_model
from prefalign.models.logps import batch_logps


def _logps_and_grads(path, tokenizer, mode, lora: bool, shared: bool):
    torch.manual_seed(0)
    model = load_model(path)
    enable_checkpointing(model, mode)
    if lora:
        model = add_lora(model, {"r": 4})
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at zero: give it values so every adapter path carries gradient
                p.data.normal_(0, 0.1)
        if mode:
            model.enable_input_require_grads()
    model.train()
    recs = [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in learnable_pairs(4)]
    data = tokenize_records(tokenizer, recs, max_length=128, max_prompt_length=64, unit="pairs")
    batch = (collate_shared_prompt if shared else collate)(
        data.examples, list(range(len(data))), tokenizer.pad_token_id
    )
    lp = batch_logps(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    return lp.detach(), torch.autograd.grad((lp * torch.linspace(1, 2, len(lp))).sum(), params)


@pytest.mark.parametrize("mode", [True, "selective"])
@pytest.mark.parametrize(("lora", "shared"), [(True, True), (False, False)])
def test_checkpointing_equals_unchecked(mode, lora, shared, tiny_models, tokenizer):
    ref_lp, ref_g = _logps_and_grads(tiny_models["llama"], tokenizer, False, lora, shared)
    lp, g = _logps_and_grads(tiny_models["llama"], tokenizer, mode, lora, shared)
    assert torch.allclose(lp, ref_lp, atol=1e-6, rtol=0), (lp - ref_lp).abs().max()
    for x, y in zip(g, ref_g, strict=True):
        assert torch.isfinite(x).all()
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-5), (x - y).abs().max()


def test_selective_policy_keeps_big_matmuls_and_recomputes_the_rest():
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    x, w, lora_a_out = torch.zeros(10, 576), torch.zeros(576, 1536), torch.zeros(10, 8)
    assert keep_matmuls(None, aten.mm.default, x, w) == CheckpointPolicy.MUST_SAVE  # a base projection
    assert keep_matmuls(None, aten.mm.default, lora_a_out, torch.zeros(8, 1536)) == CheckpointPolicy.PREFER_RECOMPUTE
    assert keep_matmuls(None, aten._scaled_dot_product_flash_attention_for_cpu.default) == CheckpointPolicy.MUST_SAVE
    for op in (aten.mul.Tensor, aten.silu.default, aten.add.Tensor, aten.rsqrt.default):
        assert keep_matmuls(None, op, x) == CheckpointPolicy.PREFER_RECOMPUTE
