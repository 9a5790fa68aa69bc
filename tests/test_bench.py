"""`prefalign bench` on this CPU: detection, the FLOP counter against hand counts, the results JSON,
and `compare` on two result files."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from prefalign.bench import device as D
from prefalign.bench.flops import llama_params, matmul_params, step_flops


def test_detection_on_this_cpu():
    dev = D.pick("auto")
    assert dev.type == "cpu"  # no accelerator on the machines that run the tests
    info = D.detect(dev)
    assert info["vendor"] == "cpu" and info["name"] and info["cpu_cores"] >= 1
    assert info["torch"] == torch.__version__ and info["memory_bytes"] > 0
    assert D.default_dtype(dev) == torch.float32
    assert D.matmul_peak(dev, torch.float32, n=256, repeats=3) > 1e8  # any CPU does 0.1 GFLOP/s


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


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "r.json"
    run = subprocess.run([sys.executable, "-m", "prefalign", "bench", "--shape", "tiny", "--workloads", "dpo,sft,ppo",
                          "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "1", "--no-logprob-memory",
                          "-o", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return out


def test_results_json_schema(results):
    r = json.loads(results.read_text())
    assert r["machine"]["peak_flops"] > 0 and r["machine"]["vendor"] == "cpu"
    assert set(r["workloads"]) == {"dpo-precompute", "dpo-adapter", "dpo-copy", "sft", "ppo"}
    for w in r["workloads"].values():
        for key in ("tokens_per_s", "step_seconds_median", "mfu", "peak_memory_bytes"):
            assert isinstance(w[key], (int, float)) and w[key] > 0, key
        assert 0 < w["mfu"] < 1
    assert r["workloads"]["dpo-copy"]["model_copies"] == 2 and r["workloads"]["dpo-precompute"]["model_copies"] == 1
    ppo = r["workloads"]["ppo"]
    assert ppo["rollout_seconds_median"] > 0 and ppo["update_seconds_median"] > 0
    assert r["dpo_vs_ppo"]["ppo_model_copies"] == 2 and r["dpo_vs_ppo"]["time_ratio_ppo_over_dpo"] > 0


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
    assert res["embedding_growth_bytes"] == (131072 - 8192) * 256 * 4 * 5
    assert res["peak_large_bytes"] > res["peak_small_bytes"] > 0 and res["vocab_memory_ratio"] > 0
