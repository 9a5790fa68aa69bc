"""The shipped model, the sentiment scorer, pair generation, and the demo and the study shrunk."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
    # measured here, not read back from training.json: perplexity on the 256 validation prefixes (openings
    # of IMDb test reviews it never trained on) was 80.8 when the model shipped; uniform over its vocabulary is 4096
    nll, count = 0.0, 0
    with torch.no_grad():
        for line in task.VALIDATION_PREFIXES.read_text().splitlines():
            ids = tok(json.loads(line)["prompt"], return_tensors="pt")["input_ids"]
            nll += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert math.exp(nll / count) < 100 and sum(p.numel() for p in model.parameters()) > 1_000_000
    for path, n in ((task.PREFIXES, 576), (task.VALIDATION_PREFIXES, 192)):  # the study's sizes
        prefixes = [json.loads(x) for x in path.read_text().splitlines()]
        assert len(prefixes) >= n and all(p["prompt"].strip() for p in prefixes)


def _write(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def test_train_validation_and_test_prompts_are_disjoint_and_a_duplicate_is_caught(tmp_path):
    rows = [json.loads(x)["prompt"] for x in task.PREFIXES.read_text().splitlines()]
    val = [json.loads(x)["prompt"] for x in task.VALIDATION_PREFIXES.read_text().splitlines()]
    assert len({task.normalise(p) for p in rows + val}) == len(rows) + len(val)  # any split point is disjoint
    sizes = task.Sizes(train_prompts=384, eval_prompts=192)
    read = lambda p: [json.loads(x)["prompt"] for x in p.read_text().splitlines()]  # noqa: E731
    train_t, test = map(read, task.split_prefixes(tmp_path / "t", sizes, "test"))
    train_v, held_v = map(read, task.split_prefixes(tmp_path / "v", sizes, "validation"))
    assert train_t == train_v == rows[192:576] and test == rows[:192] and held_v == val[:192]
    task.check_disjoint({"train": train_t, "validation": val, "test": test})
    # the same review opening with other case, punctuation and spacing is the same prompt
    assert task.normalise("Jack Frost 2, is  probably") == task.normalise("jack frost 2 IS probably!")
    twin = "  " + test[5].upper() + " !"
    with pytest.raises(ValueError, match="disjoint"):  # a test prompt injected into validation
        task.split_prefixes(tmp_path / "x", sizes, "validation", validation=_write(tmp_path / "v.jsonl", val + [twin]))
    with pytest.raises(ValueError, match="disjoint"):  # a test prompt repeated among the train prompts
        bad = rows[:300] + [test[0].lower()] + rows[300:]
        task.split_prefixes(tmp_path / "y", sizes, "test", prefixes=_write(tmp_path / "p.jsonl", bad))


def test_the_scorer_on_known_sentences():
    from prefalign.judges.sentiment import positive

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


def test_demo_runs_end_to_end_shrunk_and_both_methods_raise_the_reward(tmp_path):
    run = subprocess.run([sys.executable, "-m", "prefalign", "demo", "--quick", "--no-progress", "-o",
                          str(tmp_path / "demo")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert [r["model"] for r in summary["rows"]] == ["base", "dpo", "ppo"] and summary["split"] == "test"
    base, dpo, ppo = summary["rows"]
    assert base["kl_per_sequence"] == pytest.approx(0.0, abs=1e-6)
    # The quick settings were chosen on validation prefixes, where both cleared the base's interval
    # by a margin over several seeds (demo.py); here, on the test prefixes, they must too.
    for r in (dpo, ppo):
        assert r["reward_mean"] > base["reward_ci95"][1], (r["model"], r["reward_mean"], base["reward_ci95"])
    # costs: each stage its own process and peak; DPO's end to end adds the pairs, PPO's is its training
    stages = summary["stages"]
    assert set(stages) == {"pairs", "dpo", "ppo", "eval"} and all(c["peak_rss_bytes"] > 0 for c in stages.values())
    assert dpo["train"] == stages["dpo"] and ppo["train"] == ppo["end_to_end"] == stages["ppo"]
    assert dpo["end_to_end"]["seconds"] == pytest.approx(stages["pairs"]["seconds"] + stages["dpo"]["seconds"])
    assert dpo["end_to_end"]["peak_rss_bytes"] == max(
        stages["pairs"]["peak_rss_bytes"], stages["dpo"]["peak_rss_bytes"]
    )
    assert Path(summary["report"]).exists()
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert {r["run"] for r in report["runs"]} == {"base", "dpo", "ppo"}
    assert "Report:" in run.stderr


def test_study_runs_shrunk_with_seeds(tmp_path):
    from prefalign.tasks.study import StudyConfig, run_study

    cfg = StudyConfig(output=str(tmp_path / "s"), train_prompts=8, eval_prompts=4, samples=3, max_new_tokens=8,
                      seeds=[0, 1], dpo_betas=[0.1], ipo_betas=[0.5], ppo_kl_coefs=[0.05],
                      dpo={"max_steps": 2, "batch_size": 4}, ipo={"max_steps": 2, "batch_size": 4},
                      ppo={"max_steps": 2, "batch_size": 4}, reward_model={"max_steps": 2, "batch_size": 4},
                      iterative_rounds=2, learned_reward_min_new_tokens=[0, 4])
    summary = run_study(cfg, log=lambda _: None, progress=False)
    names = ["base", "dpo-beta0.1", "ipo-beta0.5", "ppo-kl0.05", "ppo-learned-reward", "ppo-learned-reward-min4",
             "dpo-iterative-round1", "dpo-iterative-round2"]
    assert [r["run"] for r in summary["settings"]] == names and summary["split"] == "validation"
    assert [(r["run"], r["seed"]) for r in summary["runs"]] == [(n, s) for s in (0, 1) for n in names]
    assert (tmp_path / "s" / "seed1" / "ppo-kl0.05" / "final").exists()
    held_out = (tmp_path / "s" / "seed0" / "eval_prompts.jsonl").read_text()
    assert held_out == "".join(task.VALIDATION_PREFIXES.read_text().splitlines(keepends=True)[:4])
    learned = summary["settings"][4]
    guarded = yaml.safe_load((tmp_path / "s" / "seed0" / "ppo-learned-reward-min4" / "config.yaml").read_text())
    assert summary["settings"][5]["method"] == "ppo (learned reward, min 4 tokens)" and guarded["min_new_tokens"] == 4
    assert learned["method"] == "ppo (learned reward)" and learned["seeds"] == 2 and len(learned["reward_ci95"]) == 2
    runs = {(r["run"], r["seed"]): r for r in summary["runs"]}
    # end to end: DPO adds its pairs; PPO with VADER is its training alone; the learned reward adds pairs + RM
    dpo, ppo, ppo_rm = runs["dpo-beta0.1", 0], runs["ppo-kl0.05", 0], runs["ppo-learned-reward", 0]
    assert dpo["end_to_end"]["seconds"] > dpo["train"]["seconds"] and ppo["end_to_end"] == ppo["train"]
    assert ppo_rm["end_to_end"]["seconds"] > ppo_rm["train"]["seconds"]
    # DPO (iterative): round 1 is the DPO run; round 2 trains from it on pairs it sampled itself
    r1, r2 = runs["dpo-iterative-round1", 0], runs["dpo-iterative-round2", 0]
    assert (r1["reward_mean"], r1["path"], r1["setting"]) == (dpo["reward_mean"], dpo["path"], 1)
    assert r2["method"] == "dpo (iterative)" and r2["setting"] == 2
    assert r2["end_to_end"]["seconds"] > dpo["end_to_end"]["seconds"] + r2["train"]["seconds"]
    round2 = yaml.safe_load((tmp_path / "s" / "seed0" / "dpo-iterative-round2" / "config.yaml").read_text())
    assert round2["model"] == str(tmp_path / "s" / "seed0" / "dpo-beta0.1" / "final")
    assert "dpo vs ppo" in summary["frontier"] and all("collapsed" in r for r in summary["runs"])
    assert (tmp_path / "s" / "report" / "frontier.png").exists() and (tmp_path / "s" / "frontier.png").exists()
    md = (tmp_path / "s" / "study.md").read_text()
    assert "| ppo-learned-reward | ppo (learned reward) |" in md and "**validation**" in md
