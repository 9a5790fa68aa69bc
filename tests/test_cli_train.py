"""The train CLI in both forms, every shipped example YAML on a tiny model, and merge."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import learnable_pairs, unpaired_from, write_jsonl

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "prefalign", *map(str, args)], capture_output=True, text=True)


TRAIN_EXAMPLES = [p for p in EXAMPLES if not p.name.startswith(("smollm2", "hybrid"))]  # hybrid: a recipe


@pytest.mark.parametrize("example", TRAIN_EXAMPLES, ids=lambda p: p.name)
def test_every_example_yaml_trains_a_tiny_model(example, tiny_models, tmp_path):
    import yaml

    method = yaml.safe_load(example.read_text())["method"]
    rows = learnable_pairs(16)
    data = write_jsonl(tmp_path / "d.jsonl", unpaired_from(rows) if method == "kto" else rows)
    if method in ("ppo", "rloo", "grpo"):
        inputs = [f"prompts={data}", f"reward={Path(__file__).parent / 'fixtures' / 'rewards.py'}:great",
                  "max_new_tokens=4", "batch_size=2"]
    else:
        inputs = [f"data={data}", "batch_size=4"]
    if "guards" in yaml.safe_load(example.read_text()):  # held-out pairs and text, and few suite items
        inputs += [f"eval_data={data}", f"guards.text={data}", "guards.suite_limit=2"]
    run = cli("train", example, f"model={tiny_models['llama']}", *inputs, f"output={tmp_path / 'run'}",
              "max_steps=2", "save_every=1", "--no-progress")
    assert run.returncode == 0, run.stderr
    final = tmp_path / "run" / "final"
    # a reward model is saved merged (a standalone judge); everything else as the LoRA adapter
    assert (final / ("model.safetensors" if method == "reward" else "adapter_config.json")).exists()
    assert (tmp_path / "run" / "checkpoints" / "step-2").exists()


def test_smollm2_example_is_a_valid_config():
    from prefalign.train.methods import load_train_config

    for path in [p for p in EXAMPLES if p.name.startswith("smollm2")]:
        cfg = load_train_config(path)
        assert cfg.lora_settings is not None


def test_short_form_and_errors(tiny_models, pair_file, tmp_path):
    run = cli("train", "--method", "ipo", "--model", tiny_models["gpt2"], "--data", pair_file,
              "--output", tmp_path / "run", "max_steps=2", "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "method ipo, reference copy" in run.stderr  # 2 steps x 8 < 48 pairs: a copy beats a full pass
    run = cli("train", "--method", "dpoo", "--model", tiny_models["gpt2"], "--data", pair_file, "-o", tmp_path / "x")
    assert run.returncode == 2 and "did you mean 'dpo'" in run.stderr
    run = cli("train", "--method", "dpo", "--model", tiny_models["gpt2"], "--data", pair_file, "-o", tmp_path / "x",
              "betta=0.2")
    assert run.returncode == 2 and "unknown key 'betta'; did you mean 'beta'?" in run.stderr
    run = cli("train", "--method", "kto", "--model", tiny_models["gpt2"], "--data", pair_file, "-o", tmp_path / "x")
    assert run.returncode == 2 and "unpaired examples" in run.stderr  # data: exit 2
    run = cli("train", "--method", "dpo", "--model", tmp_path / "no[pe]", "--data", pair_file, "-o", tmp_path / "x")
    # model: exit 2; the message printed as text ("[pe]" is not rich markup)
    assert run.returncode == 2 and f"{tmp_path / 'no[pe]'}: no such model folder or file, nor a Hub id" in run.stderr


def test_bad_records_are_reported_and_training_goes_on(tiny_models, tmp_path):
    rows = learnable_pairs(12)
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows)
    with open(path, "a") as f:
        f.write('{"prompt": "x", "chosen": ""}\nnot json\n')
    run = cli("train", "--method", "dpo", "--model", tiny_models["gpt2"], "--data", path, "-o", tmp_path / "run",
              "max_steps=1", "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "2 bad records set aside" in run.stderr
    assert len((tmp_path / "run" / "data_problems.jsonl").read_text().splitlines()) == 2


def test_merge_lora_adapter_into_plain_folder(tiny_models, pair_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = cli("train", "--method", "dpo", "--model", tiny_models["llama"], "--data", pair_file,
              "-o", tmp_path / "run", "max_steps=3", "lora=true", "learning_rate=1e-2", "--no-progress")
    assert run.returncode == 0, run.stderr
    run = cli("merge", tmp_path / "run" / "final", "-o", tmp_path / "merged")
    assert run.returncode == 0, run.stderr
    ids = torch.tensor([[1, 5, 9, 22, 40]])
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), tmp_path / "run" / "final"
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        a, b, c = (m(ids).logits for m in (peft, merged, base))
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(b, c, atol=1e-4)  # the adapter did something


@pytest.mark.parametrize("method,fixture", [("dpo", "llamafactory_dpo_40.json"), ("kto", "llamafactory_kto_40.json")])
def test_real_conversational_data_trains_through_the_chat_template(method, fixture, tiny_models, tmp_path):
    data = Path(__file__).parent / "fixtures" / fixture
    run = cli("train", "--method", method, "--model", tiny_models["qwen2"], "--data", data, "-o", tmp_path / "run",
              "max_steps=2", "batch_size=4", "max_length=96", "max_prompt_length=64", "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "40 examples" in run.stderr and "truncated" in run.stderr
    rows = [__import__("json").loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["tokens_per_s"] > 0 for r in rows)


def test_csv_with_message_cells(tmp_path):
    import csv
    import json

    from prefalign.data import load_records

    path = tmp_path / "c.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        w.writerow(
            [
                json.dumps([{"role": "user", "content": "hi"}]),
                json.dumps([{"role": "assistant", "content": "hello"}]),
                json.dumps([{"role": "assistant", "content": "go away"}]),
            ]
        )
    records, problems = load_records(path)
    assert problems == [] and records[0].prompt == [{"role": "user", "content": "hi"}]
    assert records[0].rejected[0]["content"] == "go away"
