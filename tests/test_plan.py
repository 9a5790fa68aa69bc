"""`prefalign plan`: each formula of bench/plan.py against a hand computation or the real thing (the
instantiated model, PEFT's adapters, AdamW's state, the tensors autograd saves), sharding by hand, and one
real training run whose memory above the measured runtime must be the estimate's within 15%."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import write_jsonl
from prefalign.bench.plan import (
    PROJECTIONS,
    Arch,
    Setup,
    estimate,
    layer_activations,
    layer_casts,
    logits_chunk,
    lora_params,
    mask_activations,
    optimizer_state,
    optimizer_temporaries,
    param_count,
)
from prefalign.bench.planner import arch_from_config, parse_size, plan, safetensors_params
from prefalign.models.load import add_lora
from prefalign.models.tiny import save_tiny, tiny_config
from prefalign.train.methods import make_config

SMOLLM2 = Arch(vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536)


def test_smollm2_parameter_count_by_hand():
    # embedding 49152 x 576; per layer q, o 576^2, k, v 576 x 192, gate/up/down 576 x 1536, 2 norms; final norm
    layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    assert param_count(SMOLLM2)["total"] == 49152 * 576 + 30 * layer + 576 == 134_515_008


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("llama", {"tie_word_embeddings": False}), ("qwen2", {}),
                                        ("mistral", {"tie_word_embeddings": False})])
def test_parameter_count_equals_the_instantiated_model(arch, extra, tokenizer, tmp_path):
    config = tiny_config(arch, 300, hidden=48, layers=3, heads=4, **extra)
    model = AutoModelForCausalLM.from_config(config)
    a = arch_from_config(config.to_dict())
    assert param_count(a)["total"] == sum(p.numel() for p in model.parameters())
    folder = save_tiny(tmp_path / arch, arch, tokenizer, hidden=48, layers=3, **extra)
    stored = safetensors_params(folder)  # headers only: the same count without loading a weight
    assert stored["params"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())


def test_lora_parameters_equal_peft_and_adamw_state_is_8_bytes_each():
    config = tiny_config("llama", 300, hidden=48, layers=3, heads=4)
    a = arch_from_config(config.to_dict())
    model = add_lora(AutoModelForCausalLM.from_config(config), {"r": 4})
    trained = [p for p in model.parameters() if p.requires_grad]
    # r (in + out) per projection, hidden 48, kv 2 heads x 12 = 24, intermediate 96: q 96, k 72, v 72, o 96,
    # gate 144, up 144, down 144 = 768 per layer; r 4, 3 layers
    assert sum(p.numel() for p in trained) == lora_params(a, 4, PROJECTIONS) == 3 * 4 * 768
    opt = torch.optim.AdamW(trained, lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    state = sum(t.nbytes for s in opt.state.values() for k, t in s.items() if k != "step")
    assert state == optimizer_state(sum(p.numel() for p in trained)) == 8 * sum(p.numel() for p in trained)


def test_logits_chunk_and_cpu_optimizer_temporaries_by_hand():
    a = Arch(vocab=1000, hidden=16, layers=1, heads=2, kv_heads=1, head_dim=8, intermediate=32)
    step = 2**20 // (4 * 1000)  # positions per 1 MiB chunk of fp32 logits: 262
    assert logits_chunk(a, Setup(rows=1, row_len=8, scored=100, mask=False, logits_chunk_mb=1)) == (100 * 4000, True)
    assert logits_chunk(a, Setup(rows=1, row_len=8, scored=1000, mask=False, logits_chunk_mb=1)) == (step * 4000,
                                                                                                    False)
    # CPU AdamW: sqrt and division, each a copy of the largest trained tensor (the 1000 x 16 embedding)
    assert optimizer_temporaries(a, Setup(rows=1, row_len=8, scored=1, mask=False)) == 2 * 4 * 1000 * 16


def test_step_phases_by_hand():
    # vocab 100, hidden 8, 2 layers, 2 heads of 4 (1 KV head), MLP 16, tied: embedding 800; a layer q 64,
    # k 32, v 32, o 64, gate/up/down 128 each, 2 norms 16 = 592; final norm 8: 1992 parameters
    a = Arch(vocab=100, hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16)
    b = estimate(a, Setup(rows=1, row_len=10, scored=5, mask=False, logits_chunk_mb=1))
    assert b.total_params == b.trainable_params == 800 + 2 * 592 + 8 == 1992
    weights, grads, adam, temps = 4 * 1992, 4 * 1992, 8 * 1992, 2 * 4 * 800  # CPU AdamW: 2 x the embedding
    assert b.phases["optimizer_step"] == weights + adam + grads + temps == 38272
    # per token and layer: norms 2 (8 + 1) 4 + 2 x 8 x 4; q, out 8, k, v 4 (no mask: grouped), lse 2 fp32;
    # MLP 3 x 16; trained Linears' inputs 8 + 8 + 16; all fp32
    layer = 2 * 9 * 4 + 2 * 8 * 4 + (8 + 8 + 4 + 4) * 4 + 2 * 4 + 3 * 16 * 4 + (8 + 8 + 16) * 4
    assert layer_activations(a, Setup(rows=1, row_len=10, scored=5, mask=False)) == layer == 560
    outside = 10 * (8 * 4 + 8 * 4 + 2 * 4 * 4) + 5 * 8 * 4  # final norm, cos/sin; the 5 scored hidden states
    chunk = 5 * 100 * 4  # one chunk of fp32 logits, kept for backward
    # the head's backward: 4 chunks at once, more than 1 chunk + the tied head's gradient (100 x 8 x 4)
    head = 10 * 2 * layer + outside + max(4 * chunk, chunk + 4 * 800)
    assert b.peak_phase == "head" and b.peak == weights + adam + head == 44224


def test_sharding_by_hand():
    # the arch of test_step_phases_by_hand: a layer 592 parameters, embedding (tied head) 800, final norm 8,
    # 1992 in all; full fp32 fine-tune over 4 processes
    a = Arch(vocab=100, hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16)
    shape = dict(rows=1, row_len=10, scored=5, mask=False, gpus=4)
    fsdp = estimate(a, Setup(**shape, strategy="fsdp")).terms
    # FSDP: a quarter of each, plus one layer and the root unit (embedding, final norm) gathered: 592 + 808
    assert fsdp["weights"] == 4 * 1992 / 4 + 4 * (592 + 808) == 7592
    assert fsdp["gradients"] == 4 * 1992 / 4 + 4 * (592 + 808) == 7592  # the gathered units' unsharded grads
    assert fsdp["optimizer_state"] == 8 * 1992 / 4 == 3984 and fsdp["ddp_buckets"] == 0
    # with bf16: the gathered copies are bf16 (MixedPrecisionPolicy) and autocast has nothing left to cast
    bf16 = estimate(a, Setup(**shape, strategy="fsdp", autocast=True, act_bytes=2)).terms
    assert bf16["weights"] == 1992 + 2 * 1400 == 4792
    assert bf16["activations_outside_layers"] == estimate(a, Setup(**shape, strategy="fsdp", autocast=True,
                                                                   act_bytes=2, base_bytes=2)).terms[
        "activations_outside_layers"]
    ddp = estimate(a, Setup(**shape, strategy="ddp")).terms
    # DDP: everything replicated, plus a bucket copy of every gradient
    assert ddp["weights"] == ddp["gradients"] == ddp["ddp_buckets"] == 4 * 1992 == 7968
    assert ddp["optimizer_state"] == 8 * 1992 == 15936


def saved_in_layer(model, batch) -> int:
    """Bytes autograd saves inside decoder layer 1 during one log-prob forward: each storage once, weights
    left out, and storages layer 0 saves too (RoPE's cos and sin, shared by every layer) left out."""
    from prefalign.models.load import unwrap
    from prefalign.models.logps import batch_logps

    layers = unwrap(model).model.layers
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where, seen = [None], {0: {}, 1: {}}

    def pack(t):
        if where[0] is not None and t.untyped_storage().data_ptr() not in weights:
            seen[where[0]].setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    for i in (0, 1):
        layers[i].register_forward_pre_hook(lambda *_, i=i: where.__setitem__(0, i))
        layers[i].register_forward_hook(lambda *_: where.__setitem__(0, None))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        batch_logps(model, batch)
    return sum(n for k, n in seen[1].items() if k not in seen[0])


@pytest.mark.parametrize("lora,layout,precision", [
    (None, "shared", "fp32"), (4, "shared", "fp32"), (None, "padded", "fp32"), (4, "padded", "fp32"),
    (None, "padding", "fp32"), (4, "padding", "fp32"),
    # a bf16 base under fp32 adapters (PEFT casts each adapter's input), and CPU bf16 autocast (each matmul
    # casts its input and weight): full and LoRA, fp32 and bf16 base
    (4, "padded", "bf16"), (4, "shared", "bf16"), (None, "padded", "autocast"), (4, "padded", "autocast"),
    (None, "shared", "autocast"), (4, "padded", "bf16+autocast")])
def test_layer_activations_equal_what_autograd_saves(lora, layout, precision, tokenizer):
    import contextlib

    from conftest import learnable_pairs
    from prefalign.data.batches import collate, collate_shared_prompt, tokenize_records
    from prefalign.data.records import PreferencePair

    config = tiny_config("llama", len(tokenizer), hidden=48, layers=2, heads=4)
    model = AutoModelForCausalLM.from_config(config)
    base = 2 if precision.startswith("bf16") else 4
    if base == 2:
        model = model.to(torch.bfloat16)
    if lora:
        model = add_lora(model, {"r": lora})  # PEFT keeps the adapters fp32, as prefalign trains them
    autocast = precision.endswith("autocast")
    pairs = [PreferencePair(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"], where=f"t:{i}")
             for i, r in enumerate(learnable_pairs(4))]
    data = tokenize_records(tokenizer, pairs, max_length=64, max_prompt_length=32)
    if layout == "padded":  # every sequence cut to the shortest: no padding, so no mask is passed
        n = min(len(s.input_ids) for e in data.examples for s in e.seqs)
        for e in data.examples:
            e.seqs = tuple(type(s)(s.input_ids[:n], s.prompt_len) for s in e.seqs)
    # "padding": padded rows as they come, some shorter than the longest: transformers passes SDPA a dense mask
    batch = (collate_shared_prompt if layout == "shared" else collate)(data.examples, [0, 1, 2, 3],
                                                                          tokenizer.pad_token_id)
    rows, length = batch["input_ids"].shape
    masked = layout != "padded"
    if layout != "shared":
        assert bool((batch["attention_mask"] == 0).any()) == (layout == "padding")
    s = Setup(rows=rows, row_len=length, scored=1, mask=masked, lora_r=lora, base_bytes=base, autocast=autocast,
              act_bytes=2 if autocast or base == 2 else 4)
    a = arch_from_config(config.to_dict())
    # the mask term of one layer: SDPA's float copy of the bool mask (the bool mask itself is made outside)
    per_layer_mask = mask_activations(a, s, 1) - mask_activations(a, s, 0)
    assert per_layer_mask == (rows * length**2 * s.act_bytes if masked else 0)
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        saved = saved_in_layer(model, batch)
    # under autocast the layer's weight casts are saved too (new storages, not the weights)
    assert saved == pytest.approx(rows * length * layer_activations(a, s) + per_layer_mask + layer_casts(a, s),
                                  rel=0.01)


def long_pairs(n: int, words: int = 300, seed: int = 0) -> list[dict]:
    """Pairs whose prompt and answers are all longer than the test's max_length: every sequence is cut to
    the worst-case shape the planner assumes."""
    import random

    from conftest import WORDS

    rng = random.Random(seed)
    text = lambda: " ".join(rng.choice(WORDS) for _ in range(words))  # noqa: E731
    return [{"prompt": text(), "chosen": " " + text(), "rejected": " " + text()} for _ in range(n)]


def test_a_real_tiny_runs_memory_above_its_runtime_is_the_estimates(tiny_models, tmp_path):
    """The measured peak RSS of a real training process (its own process, glibc returning freed blocks of
    64 KiB or more so that RSS follows live tensors), less the runtime the planner's probe measured, against
    the estimate less that runtime: what the formulas alone predict. The runtime is most of both peaks, so
    comparing whole peaks could not tell a missing term; here the activations are a quarter and the mask
    nearly half of what is compared, and dropping either moves it by more than the 15% allowed."""
    data = write_jsonl(tmp_path / "long.jsonl", long_pairs(24, words=600))
    fields = dict(method="dpo", model=str(tiny_models["llama"]), data=str(data), output=str(tmp_path / "run"),
                  max_steps=2, batch_size=16, max_length=512, max_prompt_length=128, kl_every=0,
                  malloc_mmap_threshold_mb=0.0625, device="cpu")  # RSS is the CPU's peak: pinned on a GPU box too
    cfg = make_config(**fields)
    args = [f"{k}={v}" for k, v in fields.items()]
    train = subprocess.Popen([sys.executable, "-m", "prefalign", "train", *args, "--no-progress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    planned = plan(cfg, device="cpu")  # its runtime probe runs meanwhile, in a process of its own
    _, err = train.communicate()
    assert train.returncode == 0, err
    given = next(p for p in planned["plans"] if p["as_given"])
    assert given["facts"]["rows"] == 16 and given["facts"]["row_len"] == 128 + 2 * 384
    t, runtime = given["terms"], given["terms"]["runtime"]
    assert min(t["activations_layers"], t["attention_mask"]) > 0.2 * (given["peak"] - runtime)
    measured = json.loads((tmp_path / "run" / "run.json").read_text())["peak_memory_bytes"]
    above = measured - runtime
    assert (given["peak"] - runtime) / above == pytest.approx(1, abs=0.15), (given["peak"], runtime, measured)


def test_plan_command_prints_what_fits(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", long_pairs(4, words=20))
    run = subprocess.run([sys.executable, "-m", "prefalign", "plan", f"model={tiny_models['llama']}", f"data={data}",
                          f"output={tmp_path / 'r'}", "--set", "batch_size=4", "--runtime-mb", "300",
                          "--device-memory", "0.3GB", "--device", "cpu"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    # 300 MiB of runtime alone is more than 0.3 GB: nothing fits
    verdicts = [line for line in run.stdout.splitlines() if " needs ~" in line]
    assert verdicts[0].startswith("* full fp32 needs ~0.") and len(verdicts) == 4
    assert all(line.endswith("GB: does not fit 0.30 GB") for line in verdicts)
    assert "LoRA r=8 fp32 + gradient checkpointing needs ~" in run.stdout
    cfg = make_config(method="dpo", model=str(tiny_models["llama"]), data=str(data), output=str(tmp_path / "r"))
    result = plan(cfg, device="cpu", runtime=300 * 2**20, device_memory=parse_size("1TB"), gpus=2)
    assert all(p["fits"] for p in result["plans"]) and result["strategy"] == "ddp"  # the config's default
    assert json.loads(json.dumps(result)) == result  # --json prints exactly this
    lora = plan(make_config(**{**cfg.model_dump(include={"method", "model", "data", "output"}), "lora": {"r": 16}}),
                device="cpu", runtime=0, device_memory=2**40)
    assert json.loads(json.dumps(lora)) == lora  # a LoRA settings object among the overrides too
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("24GB") == 24 * 10**9


def test_planning_for_a_gpu_and_what_is_refused(tiny_models, tmp_path, monkeypatch):
    from prefalign.bench import planner
    from prefalign.errors import ConfigError

    # planning for a GPU from a machine without one, also on a machine with one
    monkeypatch.setattr(planner.torch.cuda, "is_available", lambda: False)

    data = write_jsonl(tmp_path / "d.jsonl", long_pairs(4, words=20))
    # docs/bench.md's example, on the tiny model: a GPU planned from this CPU machine (no runtime probe)
    cfg = make_config(method="dpo", model=str(tiny_models["llama"]), data=str(data), output=str(tmp_path / "r"),
                      lora={"r": 16}, max_length=2048, max_prompt_length=1024)
    result = plan(cfg, device="cuda", device_memory=parse_size("24GB"))
    labels = [p["label"] for p in result["plans"]]
    assert labels == ["LoRA r=16 bf16", "full fp32 + bf16 autocast", "full fp32 + bf16 autocast + gradient "
                      "checkpointing", "LoRA r=16 bf16 + gradient checkpointing", "QLoRA NF4 + gradient checkpointing"]
    assert result["plans"][0]["terms"]["runtime"] == 2**30 and "assumed" in result["runtime_how"]
    with pytest.raises(ConfigError, match="RL method"):
        plan(make_config(method="ppo", model=str(tiny_models["llama"]), prompts=str(data), reward="x.py:f",
                         output=str(tmp_path / "p")), device="cpu", runtime=0)
    with pytest.raises(ConfigError, match="this model is gpt2"):
        plan(make_config(method="dpo", model=str(tiny_models["gpt2"]), data=str(data), output=str(tmp_path / "g")),
             device="cpu", runtime=0)


def test_lora_targets_follow_peft_and_bad_inputs_are_config_errors():
    from prefalign.bench.planner import lora_projections
    from prefalign.errors import ConfigError

    # PEFT matches a name equal to the module's full name or a dot-separated suffix of it
    assert lora_projections(["self_attn.q_proj", "v_proj"]) == ("q_proj", "v_proj")
    assert lora_projections(["model.layers.0.mlp.down_proj"]) == ("down_proj",)
    assert lora_projections(r".*\.(q|k)_proj") == ("q_proj", "k_proj")  # a string is a full-match regex
    assert lora_projections("all-linear") == PROJECTIONS
    for bad in (["lm_head"], ["embed_tokens", "q_proj"], ["attn.q_proj"], "lm_head"):
        with pytest.raises(ConfigError, match="target_modules"):
            lora_projections(bad)
    for bad in ("1.2.3GB", "0", "0GB", "GB", "-1GB"):
        with pytest.raises(ConfigError, match="--device-memory"):
            parse_size(bad)
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size(".5GiB") == 2**29


@pytest.mark.parametrize("field,value,match", [("attn_implementation", "eager", "probabilities"),
                                               ("attn_implementation", "flex_attention", "block mask"),
                                               ("lora", {"r": 4, "lora_dropout": 0.1}, "lora_dropout")])
def test_unmodelled_settings_are_refused_with_the_reason(field, value, match, tiny_models, tmp_path):
    from prefalign.errors import ConfigError

    data = write_jsonl(tmp_path / "d.jsonl", long_pairs(4, words=20))
    cfg = make_config(method="dpo", model=str(tiny_models["llama"]), data=str(data), output=str(tmp_path / "r"),
                      **{field: value})
    with pytest.raises(ConfigError, match=match):
        plan(cfg, device="cpu", runtime=0, device_memory=2**40)


def test_processes_follow_the_trainers_rules(tiny_models, tmp_path):
    from prefalign.errors import ConfigError

    data = write_jsonl(tmp_path / "d.jsonl", long_pairs(4, words=20))
    cfg = make_config(method="dpo", model=str(tiny_models["llama"]), data=str(data), output=str(tmp_path / "r"),
                      batch_size=6, distributed="fsdp", max_steps=1)
    with pytest.raises(ConfigError, match="must divide over the 4 processes"):  # check_world's own error
        plan(cfg, device="cpu", runtime=0, device_memory=2**40, gpus=4)
    result = plan(cfg, device="cpu", runtime=0, device_memory=2**40, gpus=3)
    given = result["plans"][0]
    # the strategy is the config's; under fsdp the trainer precomputes the reference (choose_reference)
    assert result["strategy"] == "fsdp" and given["facts"]["reference"] == "precompute"
    assert given["facts"]["per_device_batch"] == 2 and "over 3 processes" in given["label"]
    assert given["needs"] == 3 * given["peak"]  # 3 processes share one machine's RAM
    with pytest.raises(ConfigError, match="fsdp_cpu_offload"):
        plan(make_config(**{**cfg.model_dump(include={"method", "model", "data", "output"}),
                            "fsdp_cpu_offload": True, "distributed": "fsdp"}),
             device="cpu", runtime=0, device_memory=2**40, gpus=2)
