"""The memory-lean log-prob function against a plain full-vocabulary log_softmax, every architecture."""

import pytest
import torch

from prefalign.data.tokenize import tokenize
from prefalign.models.logprobs import token_logps
from prefalign.models.tiny import ARCHS, build_model
from prefalign.train.batches import pad


def batch_of(tokenizer):
    seqs = [tokenize(tokenizer, "the movie", " was good."), tokenize(tokenizer, "the plot of the film", " bad."),
            tokenize(tokenizer, "story", " it was fine and great.")]
    return pad(seqs, tokenizer.pad_token_id)


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_full_log_softmax_and_gradients(arch, tokenizer):
    torch.manual_seed(0)
    model = build_model(arch, tokenizer, hidden=32)
    b = batch_of(tokenizer)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    full = torch.log_softmax(logits[:, :-1], -1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
    expected = torch.zeros_like(b["input_ids"], dtype=torch.float32)
    expected[:, 1:] = full * b["loss_mask"][:, 1:]
    got = token_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
    assert torch.allclose(got, expected, atol=1e-5)
    # chunked over a few tokens at a time (checkpointed): same values, same gradients
    grads = []
    for chunk_mb in (128.0, 4 * len(tokenizer) * 3 / 2**20):  # the second: 3 positions per chunk
        model.zero_grad()
        lp = token_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"], chunk_mb=chunk_mb)
        assert torch.allclose(lp, expected, atol=1e-5)
        lp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    # unscored positions are exactly zero
    assert (got[~b["loss_mask"]] == 0).all()
