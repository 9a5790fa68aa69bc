"""Prompt-once rows for Mamba, Mamba-2 and their hybrids: the prompt runs once and both answers continue
from its recurrent state; log-probs and DPO gradients equal the padded layout's."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import learnable_pairs, write_jsonl
from prefalign.data.batches import Example, collate, collate_prompt_once
from prefalign.data.records import PreferencePair
from prefalign.data.tokenize import Tokenized, tokenize_pair
from prefalign.models import logps as logps_module
from prefalign.models.logps import batch_logps
from prefalign.models.prompt_once import FASTER, ROUTES, prompt_once_problem
from prefalign.models.tiny import build_model
from prefalign.train.methods import METHODS, make_config
from prefalign.train.offline import choose_layout, layout_and_reason
from prefalign.train.run import train

# prompts of 1 to 13 tokens (a 1-token prompt leaves its row all padding: nothing runs before the answer)
# and answers of 2 to 13 tokens, so most rows of both passes are padded
PAIRS = [PreferencePair("the movie was", " good and great fun.", " bad."),
         PreferencePair("I hated the plot of the film because it was", " awful.", " fine and good, why?"),
         PreferencePair("Answer: ", "yes", "no"),
         PreferencePair("a", " the end of it all, the film", " no")]


def dpo_logps_and_grads(model, batch):
    """Summed log-probs of every answer, and the gradient of a DPO loss (beta 0.3, a zero reference)
    w.r.t. every parameter: chosen and rejected enter with opposite signs, so a gradient that reached
    the prompt from one branch only would show."""
    logps = batch_logps(model, batch)
    b = len(batch["index"])
    loss = -F.logsigmoid(0.3 * (logps[:b] - logps[b:])).mean()
    return logps.detach(), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def with_conv_biases(model):
    """Trained models have conv biases; transformers initialises them to 0, which would hide a pad whose
    conv output is not zeroed (silu(0) = 0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv1d) and m.bias is not None:
                m.bias.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("arch", sorted(ROUTES))
def test_prompt_once_equals_padded_logps_and_gradients(arch, tokenizer):
    model = with_conv_biases(build_model(arch, tokenizer, hidden=32)).train()
    examples = [Example(tokenize_pair(tokenizer, p)) for p in PAIRS]
    idx = list(range(len(examples)))
    once = collate_prompt_once(examples, idx, tokenizer.pad_token_id)
    padded = collate(examples, idx, tokenizer.pad_token_id)
    assert once["input_ids"].numel() + once["prompt_ids"].numel() < padded["input_ids"].numel()
    assert int(once["tokens"]) == int(padded["attention_mask"].sum())
    assert torch.equal(once["lengths"], padded["lengths"])
    assert prompt_once_problem(model) is None
    a, ga = dpo_logps_and_grads(model, padded)
    b, gb = dpo_logps_and_grads(model, once)
    # float32 sums of ~10 log-probs near -60: the layouts round differently by ~1e-5
    assert torch.allclose(a, b, rtol=1e-6, atol=2e-5), (a - b).abs().max()
    names = [n for n, _ in model.named_parameters()]
    for name, x, y in zip(names, ga, gb, strict=True):
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), (name, (x - y).abs().max(), x.abs().max())


def pair(prompt: int, chosen: int, rejected: int, seed: int, differ_at: int | None = None) -> Example:
    """A pair of random tokens: a prompt of `prompt` tokens and answers of `chosen` and `rejected` tokens
    (no EOS: a 1-token answer is 1 scored token); differ_at: the rejected prompt differs there, so only
    the tokens before it are shared."""
    g = torch.Generator().manual_seed(seed)
    p, a, b = (torch.randint(5, 390, (n,), generator=g).tolist() for n in (prompt, chosen, rejected))
    q = list(p)
    if differ_at is not None:
        q[differ_at] = p[differ_at] % 380 + 6
    return Example((Tokenized(p + a, prompt), Tokenized(q + b, prompt)))


EDGES = {
    # 1-token answers; a 1-token prompt (its row of the prompt pass is all padding); prompts that differ
    # after 3 tokens; a 20-token prompt and an 18-token answer, longer than the tiny Mamba-2 chunk of 16
    "mixed": [pair(20, 1, 18, 0), pair(1, 2, 1, 1), pair(6, 1, 3, 2, differ_at=3), pair(9, 1, 1, 3)],
    # a prompt pass one column wide with a padded row: transformers drops the 2D mask of a 1-column forward
    "one column": [pair(2, 3, 1, 4), pair(1, 2, 2, 5)],
}


def tiny_ssm(arch: str, tokenizer):
    """A hybrid with three layers (Nemotron-H four: its third is an MLP), so that its attention layer feeds a
    Mamba layer: what the prompt's pads leave in the attention output reaches a recurrent state."""
    layers = {"mamba": 2, "mamba2": 2, "nemotron_h": 4}.get(arch, 3)
    return with_conv_biases(build_model(arch, tokenizer, hidden=32, layers=layers)).train()


def relative(x: list, y: list) -> float:
    """|x - y| / |x| over every parameter's gradient, as one vector."""
    x, y = (torch.cat([g.flatten() for g in gs if g is not None]) for gs in (x, y))
    return float((x - y).norm() / x.norm())


@pytest.mark.parametrize("arch", sorted(ROUTES))
def test_prompt_once_equals_padded_at_the_edges(arch, tokenizer):
    model = tiny_ssm(arch, tokenizer)
    for name, examples in EDGES.items():
        idx = list(range(len(examples)))
        a, ga = dpo_logps_and_grads(model, collate(examples, idx, tokenizer.pad_token_id))
        b, gb = dpo_logps_and_grads(model, collate_prompt_once(examples, idx, tokenizer.pad_token_id))
        assert torch.allclose(a, b, rtol=1e-6, atol=2e-5), (name, (a - b).abs().max())
        for x, y in zip(ga, gb, strict=True):
            assert (x is None) == (y is None), name
            if x is not None:
                assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), (name, (x - y).abs().max(), x.abs().max())


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])  # the two routes
def test_prompt_once_equals_padded_under_bf16_autocast(arch, tokenizer):
    """`precision: bf16` (autocast, fp32 weights; CPUs run it). Both layouts round differently in bf16:
    measured on these batches, their summed log-probs differ by up to 1e-2 nats (each layout about as far
    from fp32) and their gradients by under 1% of the gradient's norm; the tolerances are 3e-2 nats and 2%.
    Within them it still catches a dropped conv state or a detached state on Mamba-1, a detached state or
    a pad let into the state on Mamba-2; smaller faults (a dropped SSM state on tiny Mamba-1) hide in
    bf16's rounding and are the fp32 tests' to catch."""
    model = tiny_ssm(arch, tokenizer)
    for name, examples in EDGES.items():
        idx = list(range(len(examples)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, ga = dpo_logps_and_grads(model, collate(examples, idx, tokenizer.pad_token_id))
            b, gb = dpo_logps_and_grads(model, collate_prompt_once(examples, idx, tokenizer.pad_token_id))
        assert torch.allclose(a, b, rtol=0, atol=3e-2), (name, (a - b).abs().max())
        assert relative(ga, gb) < 2e-2, (name, relative(ga, gb))


def test_choose_layout_picks_prompt_once_where_exact(tokenizer):
    dpo, cfg = METHODS["dpo"], lambda **kw: make_config(model="-", data="-", output="-", **kw)
    assert FASTER == {("mamba", "cpu")}  # measured faster: benchmarks/results/ssm-prompt-once-cpu-2core.md
    for arch in ROUTES:
        model = build_model(arch, tokenizer, hidden=32)
        layout, why = layout_and_reason(cfg(), model, dpo)
        assert layout == ("prompt_once" if arch == "mamba" else "padded"), arch
        if arch != "mamba":  # the log says why auto left exact prompt-once rows aside
            assert "exact on" in why and "share_prompt: true takes them" in why, why
        assert choose_layout(cfg(share_prompt=True), model, dpo) == "prompt_once", arch
        assert choose_layout(cfg(share_prompt=False), model, dpo) == "padded", arch  # the user can force padded
    mamba = build_model("mamba", tokenizer, hidden=32)
    on_meta = build_model("mamba", tokenizer, hidden=32).to("meta")  # measured on CPU only: elsewhere asked for
    assert layout_and_reason(cfg(), on_meta, dpo) == ("padded", "prompt-once rows are exact but measured faster "
                                                               "only on CPU, not on meta (benchmarks/results/"
                                                               "ssm-prompt-once-cpu-2core.md); share_prompt: true "
                                                               "takes them")
    assert choose_layout(cfg(share_prompt=True), on_meta, dpo) == "prompt_once"
    assert choose_layout(cfg(method="sft"), mamba, METHODS["sft"]) == "padded"  # one sequence: no prompt to share
    assert choose_layout(cfg(distributed="fsdp"), mamba, dpo) == "padded"  # FSDP2 gathers in block hooks
    mamba2 = build_model("mamba2", tokenizer, hidden=32)
    assert choose_layout(cfg(distributed="fsdp", share_prompt=True), mamba2, dpo) == "prompt_once"
    refused = {
        "jamba": (build_model("jamba", tokenizer, hidden=32), "restart their scan from a zero state"),
        "biased in_proj": (build_model("mamba2", tokenizer, hidden=32, use_bias=True), "in_proj has a bias"),
        "checkpointing": (build_model("mamba", tokenizer, hidden=32), "gradient checkpointing"),
    }
    refused["checkpointing"][0].gradient_checkpointing_enable()
    for model, reason in refused.values():
        layout, why = layout_and_reason(cfg(), model, dpo)
        assert layout == "padded" and reason in why, why  # said in the run's log
        with pytest.raises(ValueError, match=rf"share_prompt: true needs .*prompt-once rows \(.*{reason}"):
            choose_layout(cfg(share_prompt=True), model, dpo)


def test_a_biased_in_proj_is_refused_for_a_reason(tokenizer):
    """The refusal is evidence, not belief: with a bias in in_proj a left pad's conv input is not zero,
    so transformers' cache route would be wrong; the Mamba-1 route zeroes pads itself and stays exact."""
    examples = [Example(tokenize_pair(tokenizer, p)) for p in PAIRS]
    batches = [f(examples, list(range(len(examples))), tokenizer.pad_token_id) for f in (collate, collate_prompt_once)]
    with torch.no_grad():
        model = build_model("mamba2", tokenizer, hidden=32, use_bias=True).eval()
        torch.nn.init.normal_(model.backbone.layers[0].mixer.in_proj.bias)
        a, b = (batch_logps(model, batch) for batch in batches)
        assert not torch.allclose(a, b, atol=1e-3)
        model = build_model("mamba", tokenizer, hidden=32, use_bias=True).eval()
        torch.nn.init.normal_(model.backbone.layers[0].mixer.in_proj.bias)
        a, b = (batch_logps(model, batch) for batch in batches)
        assert torch.allclose(a, b, rtol=1e-6, atol=2e-5)
    assert prompt_once_problem(model) is None


def test_dpo_training_with_prompt_once_logs_the_padded_losses(tiny_models, tmp_path, monkeypatch):
    """Two DPO steps on tiny Mamba: the first step's update is the same under both layouts, so the
    second step's loss is too. The prompt-once run really fed prompt-once batches to the model (counted
    where models/logps.py continues answers from a prompt's state); the padded run fed none."""
    data = write_jsonl(tmp_path / "d.jsonl", learnable_pairs(8))
    losses, logs, continued = {}, [], {}
    real = logps_module.prompt_once_hidden_states

    def counting(model, batch):
        continued[share] += 1
        return real(model, batch)

    monkeypatch.setattr(logps_module, "prompt_once_hidden_states", counting)
    for share in ("auto", False):
        out, continued[share] = tmp_path / f"run-{share}", 0
        train(make_config(method="dpo", model=str(tiny_models["mamba"]), data=str(data), output=str(out),
                          max_steps=2, batch_size=4, learning_rate=1e-2, share_prompt=share, kl_every=0),
              log=logs.append, progress=False)
        losses[share] = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert continued["auto"] >= 2 and continued[False] == 0, continued  # >= one forward per step
    assert any("prompt-once rows, attention" in line for line in logs), logs
    assert any("padded rows (share_prompt: false)" in line for line in logs), logs
    assert losses["auto"][0] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference at step 0
    assert losses["auto"][1] != pytest.approx(losses["auto"][0], abs=1e-3)  # the step moved the model
    assert losses["auto"] == pytest.approx(losses[False], abs=1e-5)
