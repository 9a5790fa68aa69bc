"""`prefalign bench` on whatever device this machine has: detection, the measured peak and its
spread, the FLOP counters against hand counts and against the matmuls the PPO trainer really runs,
the results JSON, and `compare` on two result files."""

import json
import shutil
import statistics
import subprocess
import sys

import pytest
import torch

from prefalign.bench import peak
from prefalign.bench.flops import llama_params, matmul_params, ppo_iteration_flops, step_flops
from prefalign.runtime import device
from prefalign.train.methods import METHODS


def test_detection_on_this_machine():
    dev = device.pick_device("auto")
    info = device.detect(dev)
    vendor = {"cpu": "cpu", "xpu": "intel", "mps": "apple",
              "cuda": "amd" if getattr(torch.version, "hip", None) else "nvidia"}[dev.type]
    assert info["device_type"] == dev.type and info["vendor"] == vendor and info["name"]
    assert info["torch"] == torch.__version__ and info["cpu_cores"] >= 1
    assert device.default_dtype(dev) == (torch.bfloat16 if dev.type in ("cuda", "xpu") else torch.float32)


def test_matmul_peak_reports_every_repeat_and_its_spread(monkeypatch):
    # a clock under the test's control: repeat i takes durations[i] seconds, so each sample must be
    # 2 n^3 / durations[i] and the median, min and max follow by hand
    n, durations = 64, [2.0, 1.0, 4.0, 0.5, 8.0]
    ticks = iter([t for i, d in enumerate(durations) for t in (100.0 * i, 100.0 * i + d)])
    monkeypatch.setattr(peak.time, "perf_counter", lambda: next(ticks))
    p = peak.matmul_peak(torch.device("cpu"), torch.float32, n=n, repeats=len(durations))
    flop = 2 * 64**3  # 524,288
    assert p["samples"] == [flop / 2, flop / 1, flop / 4, flop / 0.5, flop / 8]
    assert (p["median"], p["min"], p["max"]) == (flop / 2, flop / 8, flop / 0.5)
    assert (p["n"], p["repeats"]) == (64, 5)


def test_flop_counter_against_hand_counts():
    from transformers import AutoModelForCausalLM, LlamaConfig

    # vocab 100, hidden 16, 2 layers, 4 heads (head dim 4), 2 kv heads, MLP 32, tied embeddings:
    # attention q 16x16 + o 16x16 + k 16x8 + v 16x8 = 768; MLP 3 x 16 x 32 = 1536; norms 2 x 16 = 32
    # per block 2336, 2 blocks 4672; embedding 1600; final norm 16 -> 6288 in all
    counts = llama_params(vocab=100, hidden=16, layers=2, heads=4, kv_heads=2, intermediate=32)
    assert counts["total"] == 6288
    cfg = LlamaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == 6288
    # matmul weights: 2 x (768 + 1536) = 4608 in the blocks, plus the tied head 1600 = 6208
    assert matmul_params(model) == counts["matmul"] == 6208
    assert step_flops(6208, 10) == 6 * 6208 * 10
    assert step_flops(6208, 10, train="lora", reference_tokens=10) == 4 * 6208 * 10 + 2 * 6208 * 10


def test_ppo_flops_against_a_hand_count():
    # the tiny Llama above: N = 6208 matmul weights, of which the head 1600 (100 x 16), trunk 4608,
    # hidden 16 (the value head's 16 -> 1). A rollout of 2 rows, prompt width 5, 3 completion columns
    # generated, 5 scored tokens (one row ended at its 2nd token), 4 PPO epochs, full fine-tune.
    f = ppo_iteration_flops(6208, 1600, 16, rows=2, prompt=5, generated=3, scored=5, epochs=4)
    # generation: trunk over 5 + 3 - 1 = 7 positions per row: 2 x 4608 x 2 x 7 = 129,024;
    #   head once per forward call, 3 per row: 2 x 1600 x 2 x 3 = 19,200
    assert f["generation"] == 129_024 + 19_200 == 148_224
    # old log-probs + values: trunk over 8 columns: 2 x 4608 x 16 = 147,456; head on 5 scored tokens
    #   for log-probs 2 x 1600 x 5 = 16,000 and again for the entropy 16,000; value head on 2 x 3
    #   completion columns 2 x 16 x 6 = 192
    assert f["old_logprobs_values"] == 147_456 + 16_000 + 16_000 + 192 == 179_648
    # reference: 147,456 + 16,000
    assert f["reference"] == 163_456
    # update, per epoch: 6 x 4608 x 16 = 442,368; 6 x 1600 x 5 = 48,000; 6 x 16 x 6 = 576 -> 490,944; x 4
    assert f["update"] == 4 * (442_368 + 48_000 + 576) == 1_963_776
    assert f["rollout"] == 148_224 + 179_648 + 163_456 == 491_328
    assert f["total"] == 491_328 + 1_963_776 == 2_455_104
    # LoRA-frozen base: 4x the forward in the update for the policy; the value head is trained fully
    lora = ppo_iteration_flops(6208, 1600, 16, rows=2, prompt=5, generated=3, scored=5, epochs=4, train="lora")
    assert lora["update"] == 4 * (4 * 4608 * 16 + 4 * 1600 * 5 + 576) == 4 * (294_912 + 32_000 + 576)


def test_ppo_flops_equal_the_matmuls_run_rl_performs(tokenizer, tmp_path, monkeypatch):
    """Every nn.Linear call of a real PPO iteration (tiny Llama, 2 epochs x 2 minibatches) is
    tallied at 2 x in x out per row: the counter's forward part must equal it exactly, so the head
    is charged where it is applied and nowhere else."""
    from prefalign.bench.rl import bench_config, model_counts, recorded_rollouts, write_prompts
    from prefalign.models.tiny import save_tiny
    from prefalign.train.run import train

    model_dir = save_tiny(tmp_path / "m", "llama", tokenizer, hidden=32)
    assert write_prompts(tokenizer, 2, 6, tmp_path / "p.jsonl") == [6, 6]
    cfg = bench_config(model_dir, tmp_path / "p.jsonl", tmp_path / "run", batch=2, new_tokens=5, max_steps=1,
                       device="cpu", precision="fp32", ppo_epochs=2, num_minibatches=2)
    tally, forward = [], torch.nn.Linear.forward

    def counting(self, x):
        tally.append(2 * self.in_features * self.out_features * (x.numel() // self.in_features))
        return forward(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting)
    with recorded_rollouts() as shapes:
        train(cfg, log=lambda _: None, progress=False)
    monkeypatch.undo()
    (s,) = shapes
    assert (s["rows"], s["prompt"]) == (2, 6) and 1 <= s["generated"] <= 5
    c = model_counts(model_dir)
    f = ppo_iteration_flops(c["params_matmul"], c["params_head"], c["hidden"], rows=2, prompt=6,
                            generated=s["generated"], scored=s["scored"], epochs=2)
    # a full fine-tune's update is forward + backward = 3x its forward; the rest is forward only
    assert sum(tally) == f["rollout"] + f["update"] // 3


def test_model_size_statements():
    """The sizes docs/bench.md states, counted: the bench's llama-30m shape (tied 32k head) and the
    TRL benchmark's tiny Llama (benchmarks/dpo_vs_trl.py: untied, models/tiny.py's kv heads = heads/2,
    MLP 2 x hidden)."""
    from transformers import AutoModelForCausalLM

    from prefalign.bench.shapes import SHAPES, build
    from prefalign.models.tiny import tiny_config

    s = SHAPES["llama-30m"]
    with torch.device("meta"):
        shape = build("llama-30m", None, torch.device("meta"))
        trl = AutoModelForCausalLM.from_config(tiny_config("llama", 32000, hidden=384, layers=6, heads=6,
                                                           tie_word_embeddings=False))
    # llama-30m: per block 4 x 384^2 + 3 x 384 x 1024 + 2 x 384 = 1,770,240; x 6 = 10,621,440;
    # embedding 32000 x 384 = 12,288,000; final norm 384 -> 22,909,824
    assert sum(p.numel() for p in shape.parameters()) == 22_909_824 == llama_params(
        s["vocab"], s["hidden"], s["layers"], s["heads"], s["kv_heads"], s["intermediate"])["total"]
    # TRL's tiny Llama: per block 2 x 384^2 + 2 x 384 x 192 + 3 x 384 x 768 + 768 = 1,327,872;
    # x 6 = 7,967,232; embedding and head 2 x 12,288,000; final norm 384 -> 32,543,616
    assert sum(p.numel() for p in trl.parameters()) == 32_543_616


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "r.json"
    run = subprocess.run([sys.executable, "-m", "prefalign", "bench", "--shape", "tiny", "--workloads", "dpo,sft,ppo",
                          "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1", "--no-logprob-memory",
                          "-o", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return out


def test_results_json_schema(results):
    r = json.loads(results.read_text())
    m = r["machine"]
    assert m["vendor"] == device.detect(device.pick_device("auto"))["vendor"]
    # one peak for the whole file, with its spread; every MFU in the file is against that median
    assert len(m["peak_flops_samples"]) == m["peak_repeats"] >= 3
    assert m["peak_flops"] == statistics.median(m["peak_flops_samples"])
    assert m["peak_flops_min"] == min(m["peak_flops_samples"]) <= m["peak_flops"] <= m["peak_flops_max"]
    assert set(r["workloads"]) == {"dpo-precompute", "dpo-adapter", "dpo-copy", "sft", "ppo"}
    for name, w in r["workloads"].items():
        for key in ("tokens_per_s", "step_seconds_median", "mfu", "peak_memory_bytes", "flops_per_step"):
            assert isinstance(w[key], (int, float)) and w[key] > 0, (name, key)
        assert w["mfu"] == pytest.approx(w["flops_per_step"] / w["step_seconds_median"] / m["peak_flops"], rel=1e-12)
        assert 0 < w["mfu"] < 1
    assert r["workloads"]["dpo-copy"]["model_copies"] == 2 and r["workloads"]["dpo-precompute"]["model_copies"] == 1
    assert r["dpo_vs_ppo"]["time_ratio_ppo_over_dpo"] == (
        r["workloads"]["ppo"]["step_seconds_median"] / r["workloads"]["dpo-precompute"]["step_seconds_median"])


def test_ppo_workload_is_the_trainer_iteration(results):
    p = json.loads(results.read_text())["workloads"]["ppo"]
    assert p["trainer"] == "prefalign.train.ppo.run_rl" and p["critic"] == "value_head"
    assert p["reference"] == "copy" and p["model_copies"] == 2
    # the trainer's defaults, not a one-epoch proxy
    assert p["ppo_epochs"] == METHODS["ppo"].config.model_fields["ppo_epochs"].default == 4
    assert p["num_minibatches"] == METHODS["ppo"].config.model_fields["num_minibatches"].default
    # 1 warm-up iteration dropped, 2 timed; times are the trainer's own (metrics.jsonl)
    assert p["warmup_steps_excluded"] == 1 and len(p["step_seconds"]) == len(p["rollouts"]) == 2
    for step, rollout, update in zip(p["step_seconds"], p["rollout_seconds"], p["update_seconds"], strict=True):
        assert step == pytest.approx(rollout + update, rel=1e-9)
    assert p["step_seconds_median"] == statistics.median(p["step_seconds"])
    # --seq 32: prompts of 16 tokens, up to 16 new ones, 2 rows
    assert p["prompt_tokens"] == [16, 16]
    flops = []
    for s in p["rollouts"]:
        assert (s["rows"], s["prompt"]) == (2, 16) and 1 <= s["generated"] <= 16
        assert s["tokens"] == 2 * 16 + s["scored"]
        flops.append(ppo_iteration_flops(p["params_matmul"], p["params_head"], p["hidden"], rows=2, prompt=16,
                                         generated=s["generated"], scored=s["scored"], epochs=4)["total"])
    assert p["flops_per_step"] == pytest.approx(statistics.mean(flops), rel=1e-12)
    assert p["tokens_per_s"] == pytest.approx(p["tokens_per_step"] / p["step_seconds_median"], rel=1e-12)


def test_compare_two_result_files(results, tmp_path):
    other = json.loads(results.read_text())
    for w in other["workloads"].values():
        w["tokens_per_s"] *= 2
    other["machine"]["name"] = "a faster machine"
    b = tmp_path / "b.json"
    b.write_text(json.dumps(other))
    a = tmp_path / "a.json"
    shutil.copy(results, a)
    run = subprocess.run([sys.executable, "-m", "prefalign", "bench", "compare", str(a), str(b), "-o",
                          str(tmp_path / "cmp")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "(x2.00)" in md and "(x1.00)" in md and "a faster machine" in md
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_logprob_memory_reports_its_parts():
    from prefalign.bench.run import logprob_memory_workload

    res = logprob_memory_workload({"batch": 1, "seq": 64, "steps": 1, "warmup": 0, "device": "cpu", "peak_flops": 1e11},
                                  lambda _: None)
    assert res["vocab_small"] == 8192 and res["vocab_large"] == 131072
    # five fp32 buffers the size of the tied 256-wide embedding grow with the vocabulary:
    # (131072 - 8192) x 256 x 4 bytes = 125,829,120 each, 629,145,600 in all
    growth = (131072 - 8192) * 256 * 4 * 5
    assert res["embedding_growth_bytes"] == growth == 629_145_600
    # the weight, its gradient and AdamW's two moments are really held: the 128k run's peak is at
    # least those four buffers above the 8k run's (it would not be, were the vocabulary not changed)
    assert res["peak_large_bytes"] - res["peak_small_bytes"] >= 4 * 125_829_120
    assert res["vocab_memory_ratio"] == (res["peak_large_bytes"] - growth) / res["peak_small_bytes"]
