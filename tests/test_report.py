"""`prefalign report` over a DPO run with its eval and a PPO run; the HTML opens in headless Chromium."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import headless_chromium, learnable_pairs, write_jsonl

REWARDS = Path(__file__).parent / "fixtures" / "rewards.py"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "prefalign", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def report(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = write_jsonl(root / "pairs.jsonl", learnable_pairs(24))
    model = tiny_models["llama"]
    assert cli("train", "--method", "dpo", "--model", model, "--data", data, "-o", root / "dpo", "max_steps=4",
               "lora=true", "learning_rate=0.01", "--no-progress").returncode == 0
    assert cli("eval", "--model", root / "dpo" / "final", "--data", data, "--judge", f"{REWARDS}:length",
               "-o", root / "dpo" / "eval", "max_new_tokens=4", "max_prompts=8", "--no-progress").returncode == 0
    assert cli("train", "--method", "ppo", "--model", model, "--prompts", data, "--reward", f"{REWARDS}:great",
               "-o", root / "ppo", "max_steps=3", "batch_size=4", "max_new_tokens=4", "--no-progress").returncode == 0
    run = cli("report", root / "dpo", root / "ppo", "-o", root / "out")
    assert run.returncode == 0, run.stderr
    return root / "out"


def test_report_files_and_numbers(report):
    data = json.loads((report / "report.json").read_text())
    rows = {r["run"]: r for r in data["runs"]}
    assert rows["dpo"]["method"] == "dpo" and rows["ppo"]["method"] == "ppo"
    assert rows["dpo"]["preference_accuracy"] is not None and "kl_per_sequence" in rows["dpo"]
    assert rows["ppo"]["model_copies"] == 2 and rows["ppo"]["wall_seconds"] > 0
    assert set(data["images"]) == {"curves", "frontier"}
    md = (report / "report.md").read_text()
    assert "![Reward vs KL](frontier.png)" in md and "| dpo | dpo |" in md
    for name in ("curves.png", "frontier.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rejects_a_folder_with_nothing_in_it(tmp_path):
    run = cli("report", tmp_path, "-o", tmp_path / "out")
    assert run.returncode == 2 and "neither a training run" in run.stderr


def test_html_report_opens_in_headless_chromium(report, tmp_path):
    browser = headless_chromium(tmp_path / "profile")
    try:
        browser.get((report / "report.html").resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);")
        assert {alt for alt, *_ in images} == {"frontier", "curves"}
        assert all(complete and w > 100 and h > 100 for _, complete, w, h in images), images
        rows = browser.execute_script("return document.querySelectorAll('tbody tr').length;")
        assert rows == 2
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    finally:
        browser.quit()
