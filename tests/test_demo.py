"""The shipped model, the sentiment scorer, pair generation, and the demo and the study shrunk."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prefalign.tasks import sentiment as task


def test_the_shipped_model_loads_with_plain_transformers_and_writes_english():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = task.BASE_MODEL
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size <= 25 * 2**20, size
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("This movie was", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=20, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
    words = text.split()
    assert len(words) >= 8
    common = {"the", "a", "and", "of", "to", "is", "it", "i", "this", "that", "was", "in", "movie", "film"}
    assert sum(w.strip(".,!?\"'").lower() in common for w in words) >= 3, text  # English function words
    record = json.loads((folder / "training.json").read_text())
    assert record["held_out_perplexity"] < 200 and record["parameters"] > 1_000_000
    prefixes = [json.loads(x) for x in task.PREFIXES.read_text().splitlines()]
    assert len(prefixes) >= 576 and all(p["prompt"].strip() for p in prefixes)


def test_the_scorer_on_known_sentences():
    from prefalign.eval.sentiment import positive

    pos, neg, neutral = positive(["x"] * 3, ["This movie was wonderful, I loved every minute of it.",
                                             "Terrible, boring and awful. I hated it.", "The film is 90 minutes long."])
    assert pos > 0.5 and neg < -0.5 and abs(neutral) < 0.05


def test_pair_generation_is_deterministic_under_a_seed(tmp_path):
    sizes = task.Sizes(train_prompts=6, eval_prompts=2, samples=3, max_new_tokens=8, seed=5)
    texts = []
    for name in ("a", "b"):
        train, _ = task.split_prefixes(tmp_path / name, sizes)
        pairs, summary = task.make_pairs(tmp_path / name, task.BASE_MODEL, train, sizes, lambda _: None)
        rows = [json.loads(x) for x in pairs.read_text().splitlines()]
        texts.append([{k: v for k, v in r.items() if k != "source"} for r in rows])  # source: the file's own path
        assert summary["sample"]["completions"] == 18
    assert texts[0] == texts[1] and texts[0]
    rows = texts[0]
    assert all(r["margin"] > 0 for r in rows)  # best vs worst by VADER


def test_demo_runs_end_to_end_shrunk(tmp_path):
    run = subprocess.run([sys.executable, "-m", "prefalign", "demo", "--quick", "--no-progress", "-o",
                          str(tmp_path / "demo")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert [r["model"] for r in summary["rows"]] == ["base", "dpo", "ppo"]
    assert summary["rows"][0]["kl_per_sequence"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["kl_per_sequence"] >= 0 for r in summary["rows"])
    assert Path(summary["report"]).exists()
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert {r["run"] for r in report["runs"]} == {"base", "dpo", "ppo"}
    assert "Report:" in run.stderr


def test_study_runs_shrunk(tmp_path):
    from prefalign.study import StudyConfig, run_study

    cfg = StudyConfig(output=str(tmp_path / "s"), train_prompts=8, eval_prompts=4, samples=3, max_new_tokens=8,
                      dpo_betas=[0.1], ipo_betas=[0.5], ppo_kl_coefs=[0.05],
                      dpo={"max_steps": 2, "batch_size": 4}, ipo={"max_steps": 2, "batch_size": 4},
                      ppo={"max_steps": 2, "batch_size": 4}, reward_model={"max_steps": 2, "batch_size": 4})
    summary = run_study(cfg, log=lambda _: None, progress=False)
    assert [r["run"] for r in summary["rows"]] == ["base", "dpo-beta0.1", "ipo-beta0.5", "ppo-kl0.05",
                                                   "ppo-learned-reward"]
    assert summary["rows"][-1]["method"] == "ppo (learned reward)"
    assert (tmp_path / "s" / "report" / "frontier.png").exists()
    assert "| ppo-learned-reward | ppo (learned reward) |" in (tmp_path / "s" / "study.md").read_text()
