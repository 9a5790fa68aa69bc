"""The memory-lean log-prob function against a plain full-vocabulary log_softmax, every architecture."""

import pytest
import torch

from prefalign.data.batches import pad
from prefalign.data.tokenize import tokenize
from prefalign.models.logps import token_logps
from prefalign.models.tiny import ARCHS, build_model


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


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "mistral"])
def test_shared_prompt_layout_equals_padded(arch, bos_tokenizer):
    from prefalign.data.batches import Example, collate, collate_shared_prompt
    from prefalign.data.records import PreferencePair
    from prefalign.data.tokenize import tokenize_pair
    from prefalign.models.logps import batch_logps

    tok = bos_tokenizer
    pairs = [PreferencePair("the movie was", " good and great fun.", " bad."),
             PreferencePair("I hated the plot of the film because", " it was awful.", " it was fine and good, why?"),
             PreferencePair("Answer: ", "yes", "no")]  # a seam that BPE merges differently per answer
    examples = [Example(tokenize_pair(tok, p)) for p in pairs]
    torch.manual_seed(0)
    model = build_model(arch, tok, hidden=32)
    padded = collate(examples, [0, 1, 2], tok.pad_token_id)
    shared = collate_shared_prompt(examples, [0, 1, 2], tok.pad_token_id)
    assert shared["input_ids"].numel() < padded["input_ids"].numel()
    assert int(shared["tokens"]) == int(padded["attention_mask"].sum())
    a = batch_logps(model, padded)
    b = batch_logps(model, shared)
    assert torch.allclose(a, b, atol=1e-5), (a, b)
    ga = torch.autograd.grad(batch_logps(model, padded).sum(), list(model.parameters()), allow_unused=True)
    gb = torch.autograd.grad(batch_logps(model, shared).sum(), list(model.parameters()), allow_unused=True)
    for x, y in zip(ga, gb, strict=True):
        if x is not None:
            assert torch.allclose(x, y, atol=1e-5)
