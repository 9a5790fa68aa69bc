"""Mamba-2 and attention/Mamba hybrids: the row layouts that bend the attention mask are used only
where every layer honours it, and LoRA's default targets train on every architecture."""

import json

import pytest
import torch

from conftest import learnable_pairs, write_jsonl
from prefalign.data.batches import Example, collate, collate_packed, collate_shared_prompt
from prefalign.data.records import PreferencePair
from prefalign.data.tokenize import tokenize_pair
from prefalign.models.arch import PURE_ATTENTION, block_mask_problem, honours_block_mask
from prefalign.models.logps import batch_logps
from prefalign.models.tiny import ARCHS, SSM_ARCHS, build_model, save_tiny
from prefalign.train.methods import METHODS, make_config
from prefalign.train.offline import choose_layout
from prefalign.train.run import train

HYBRIDS = ("jamba", "bamba", "falcon_h1", "nemotron_h", "granitemoehybrid")
COLLATE = {"padded": collate, "shared_prompt": collate_shared_prompt, "packed": collate_packed}
PAIRS = [PreferencePair("the movie was", " good and great fun.", " bad."),
         PreferencePair("I hated the plot of the film because", " it was awful.", " it was fine and good, why?"),
         PreferencePair("Answer: ", "yes", "no")]


def same(a, b) -> bool:
    # float32 sums of ~50 log-probs near -150 agree to ~3e-5 across layouts; the hybrids' errors are >5e-4
    return torch.allclose(a, b, rtol=1e-6, atol=1e-5)


def logps(model, tok, layout: str):
    examples = [Example(tokenize_pair(tok, p)) for p in PAIRS]
    with torch.no_grad():
        return batch_logps(model.eval(), COLLATE[layout](examples, [0, 1, 2], tok.pad_token_id))


def cfg(**kw):
    return make_config(model="unused", data="unused", output="unused", **kw)


@pytest.mark.parametrize("model_type", sorted(PURE_ATTENTION))
def test_every_allow_listed_architecture_keeps_row_layouts_exact(model_type, tokenizer):
    """The allow-list is evidence, not belief: each entry's shared/packed rows equal padded rows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=tokenizer.pad_token_id,
              num_local_experts=2, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32)
    if model_type == "gpt2":
        kw = dict(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw))
    assert honours_block_mask(model, max_length=512)
    padded = logps(model, tokenizer, "padded")
    assert same(logps(model, tokenizer, "shared_prompt"), padded)
    assert same(logps(model, tokenizer, "packed"), padded)


def test_which_models_honour_the_block_mask():
    for arch in ("gpt2", "llama", "qwen2", "mistral"):
        assert honours_block_mask(build_model(arch, vocab_size=64, hidden=32))
    for arch in ("mamba", *SSM_ARCHS):
        problem = block_mask_problem(build_model(arch, vocab_size=64, hidden=32))
        assert problem and problem.startswith(f"{arch} has Mamba/SSM layers"), problem
    # attention heads are not enough: an architecture nobody checked gets the always-exact padded rows
    from transformers import AutoModelForCausalLM, PhiConfig

    phi = AutoModelForCausalLM.from_config(PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=4))
    assert "not a known pure-attention architecture" in block_mask_problem(phi)


def test_sliding_windows_longer_than_max_length_only(tokenizer):
    """transformers takes a custom 4D mask as given, so a sliding-window layer forgets its window:
    rows are exact only where no sequence is longer than the window."""
    model = build_model("mistral", tokenizer, hidden=32, sliding_window=4)
    longest = max(len(s.input_ids) for p in PAIRS for s in tokenize_pair(tokenizer, p))
    assert "sliding-window layers (4 tokens)" in block_mask_problem(model, max_length=longest)
    assert not same(logps(model, tokenizer, "shared_prompt"), logps(model, tokenizer, "padded"))  # the reason
    assert honours_block_mask(model, max_length=4)
    assert honours_block_mask(build_model("mistral", tokenizer, hidden=32, sliding_window=longest), longest)


@pytest.mark.parametrize("arch", HYBRIDS)
def test_hybrids_never_get_mask_rows(arch, tokenizer):
    model = build_model(arch, tokenizer, hidden=32)
    dpo = METHODS["dpo"]
    # the bug guarded against: shared rows carry the chosen answer's Mamba state into the rejected one
    assert not same(logps(model, tokenizer, "shared_prompt"), logps(model, tokenizer, "padded"))
    # padded rows by default; prompt-once rows when asked, where proven exact (tests/test_ssm_prompt_once.py)
    assert choose_layout(cfg(share_prompt="auto"), model, dpo) == "padded"
    if arch == "jamba":
        with pytest.raises(ValueError, match="restart their scan from a zero state"):
            choose_layout(cfg(share_prompt=True), model, dpo)
    else:
        assert choose_layout(cfg(share_prompt=True), model, dpo) == "prompt_once"
    with pytest.raises(ValueError, match=rf"{arch} has Mamba/SSM layers.*ignore the attention mask"):
        choose_layout(cfg(packing=True), model, dpo)
    assert choose_layout(cfg(share_prompt="auto"), build_model("llama", tokenizer, hidden=32), dpo) == "shared_prompt"


@pytest.mark.parametrize("arch", ARCHS + SSM_ARCHS)
def test_every_default_lora_target_is_trained(arch, tokenizer):
    """Every default adapter gets a gradient in a training-mode forward: none sits on a weight
    that the mixer reads directly (e.g. Mamba's dt_proj), and PEFT accepts them all (Mamba-2)."""
    from prefalign.models.load import add_lora

    model = add_lora(build_model(arch, tokenizer, hidden=32)).train()
    ids = torch.randint(5, len(tokenizer), (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    lora_b = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b
    inert = [n for n, g in lora_b.items() if g is None or not g.abs().sum() > 0]
    assert not inert, inert


@pytest.mark.parametrize("arch", ["mamba2", "bamba"])
def test_lora_dpo_trains_on_mamba2_and_a_hybrid(arch, tokenizer, tmp_path):
    from safetensors.torch import load_file

    model = save_tiny(tmp_path / arch, arch, tokenizer, hidden=32)
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(16))
    out = tmp_path / "run"
    # the KL monitor samples completions: slow on Mamba's CPU scan, and not what is tested here
    no_monitor = {"kl_every": 0}
    logs: list[str] = []
    # batch_size = the whole set: full-batch steps, so the logged losses are one trajectory, not noise
    # share_prompt: true: prompt-once rows (the default on these models is padded rows)
    train(make_config(model=str(model), data=str(data), output=str(out), method="dpo", lora=True,
                            max_steps=6, batch_size=16, learning_rate=2e-2, lr_schedule="constant", beta=0.5,
                            share_prompt=True, **no_monitor), log=logs.append, progress=False)
    assert any("LoRA" in line and "prompt-once rows" in line for line in logs), logs
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference at step 0
    assert losses[-1] < losses[0] - 0.1, losses
    adapters = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert any("in_proj" in k for k in adapters)
    assert all(float(v.abs().sum()) > 0 for k, v in adapters.items() if "lora_B" in k)  # all moved off zero
