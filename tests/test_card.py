"""Model cards: `prefalign train` leaves final/README.md in the Hub's format; `prefalign card RUN`
rewrites it after a real `prefalign eval`. Every number on the card is read back and compared with the
file it came from (config.yaml, run.json, `prefalign data stats --json`, eval.json)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, metadata_load

from conftest import held_out_pairs, learnable_pairs, write_jsonl
from prefalign.report.card_body import num
from prefalign.report.card_sources import hub_id
from prefalign.train.methods import METHODS, citations, load_train_config

REWARDS = Path(__file__).parent / "fixtures" / "rewards.py"
ARITHMETIC = Path(__file__).parent.parent / "src" / "prefalign" / "eval" / "suites" / "arithmetic.jsonl"


def prefalign(*args) -> int:
    """The `prefalign` command in this process (what the console script runs), its exit code."""
    from prefalign.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["prefalign", *map(str, args)])
        for var in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):  # main() sets them; give them back after
            mp.setenv(var, "1")
        try:
            main()
        except SystemExit as e:
            return int(e.code or 0)
    return 0


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of a text, in order: its rows' cells (backticks around a first cell dropped)."""
    out = []
    for block in text.split("\n\n"):
        lines = [x for x in block.strip().splitlines() if x.startswith("| ") and not x.startswith("|---")]
        if lines:
            out.append([[c.strip() for c in line.strip("|").split(" | ")] for line in lines])
            for cells in out[-1]:
                cells[0] = cells[0].strip("`")
    return out


def rows(text: str) -> dict[str, list[str]]:
    """The rows of the markdown table(s) in a text, by first cell."""
    return {cells[0]: cells[1:] for table in tables(text) for cells in table}


@pytest.fixture(scope="module")
def run(tiny_models, tmp_path_factory) -> dict:
    """A tiny DPO LoRA run by the CLI, its base model and data laid out as the Hugging Face cache
    holds what it downloaded (so the card's header has Hub ids to find), the base's own card MIT."""
    root = tmp_path_factory.mktemp("card")
    base = shutil.copytree(tiny_models["llama"], root / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / "0a1b")
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a tiny model\n")
    data = root / "hub" / "datasets--tiny-org--pairs" / "snapshots" / "0a1b" / "pairs.jsonl"
    data.parent.mkdir(parents=True)
    write_jsonl(data, learnable_pairs(24))
    out = root / "run"
    argv = ["train", "--method", "dpo", "--model", base, "--data", data, "-o", out, "max_steps=2", "batch_size=4",
            "lora=true", "beta=0.2", "rpo_alpha=0.5", "--no-progress"]
    assert prefalign(*argv) == 0
    return {"out": out, "argv": argv, "data": data, "base": base, "card": (out / "final" / "README.md").read_text(),
            "config": yaml.safe_load((out / "config.yaml").read_text()), "root": root}


def test_training_writes_a_card_the_hub_parses(run):
    card = ModelCard.load(run["out"] / "final" / "README.md")
    meta = card.data.to_dict()
    assert meta == metadata_load(run["out"] / "final" / "README.md")
    assert meta["base_model"] == "tiny-org/tiny-llama"  # the cache folder's id, not the local path
    assert meta["license"] == "mit"  # read from the base's own card
    assert meta["datasets"] == ["tiny-org/pairs"]
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["prefalign", "dpo", "lora"]
    assert "Not evaluated yet: `prefalign eval --model" in section(run["card"], "Evaluation")


def test_hyperparameters_and_the_config_block_are_the_runs(run):
    method = section(run["card"], "Method")
    table = rows(method.split("### Hyperparameters", 1)[1].split("<details>", 1)[0])
    assert {"beta", "rpo_alpha", "label_smoothing", "learning_rate", "max_steps", "batch_size", "lora"} <= set(table)
    for key, (cell, _) in table.items():
        if key == "key":
            continue
        try:
            shown = json.loads(cell)
        except json.JSONDecodeError:
            shown = cell
        assert shown == run["config"][key], key
    assert table["beta"][0] == "0.2" and table["rpo_alpha"][0] == "0.5"
    block = yaml.safe_load(method.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert block == run["config"]
    # the card alone reproduces the run: its config block is a valid train config of the same settings
    path = run["root"] / "from-card.yaml"
    path.write_text(yaml.safe_dump(block))
    assert load_train_config(path).model_dump(mode="json") == run["config"]


def test_the_command_and_the_cost_come_from_run_json(run):
    summary = json.loads((run["out"] / "run.json").read_text())
    assert shlex.split(summary["command"]) == ["prefalign", *map(str, run["argv"])]
    assert f"```bash\n{summary['command']}\n```" in section(run["card"], "Reproduce")
    cost = rows(section(run["card"], "Cost"))
    assert cost["hardware"] == [summary["device"]] and summary["device"].startswith("cpu (")
    assert cost["steps"][0].startswith(f"{summary['steps']} (max_steps")
    assert cost["tokens"] == [f"{summary['tokens']} ({num(summary['tokens_per_s'])} tokens/s)"]
    assert cost["wall time of the training loop"] == [f"{num(summary['wall_seconds'])} s"]


def test_data_statistics_are_prefalign_data_stats(run, capsys):
    capsys.readouterr()
    assert prefalign("data", "stats", run["data"], "--tokenizer", run["out"] / "final", "--json") == 0
    stats = json.loads(capsys.readouterr().out)
    counts, lengths = tables(section(run["card"], "Training data"))
    counts = {cells[0]: cells[1:] for cells in counts}
    head, row = counts["file"], counts[f"{run['data']}` (data)"]
    assert head[:3] == ["records", "valid", "invalid"] and stats["records"] == 24
    assert row == [num(stats[k]) for k in head]
    # one row per length (prompt, chosen, rejected; in characters and in tokens), keyed here by the length
    by_length = {cells[1]: cells[2:] for cells in lengths}
    assert set(by_length) - {"length"} == {k for k, v in stats.items() if isinstance(v, dict) and "p50" in v}
    assert by_length["chosen_tokens"] == [num(stats["chosen_tokens"][q]) for q in ("mean", "p50", "p90", "p99", "max")]
    assert json.loads((run["out"] / "data_stats.json").read_text())["files"][0]["stats"] == stats


def test_the_citation_is_the_methods_paper(run):
    bib = section(run["card"], "Citation").split("```bibtex\n", 1)[1].split("\n```", 1)[0]
    assert bib == "\n\n".join(citations(run["config"]))
    assert "eprint = {2305.18290}" in bib and "eprint = {2404.19733}" in bib  # DPO, and RPO (rpo_alpha 0.5)
    assert "2310.12036" not in bib  # IPO's


def test_every_method_cites_its_paper():
    for name, spec in METHODS.items():
        if name == "sft":
            assert spec.citation == () and citations({"method": "sft"}) == []
            continue
        first = spec.citation[0]
        assert re.match(r"@\w+\{\w+,\n", first) and first.count("{") == first.count("}"), name
        assert spec.paper.split(" et al.")[0].split()[0] in first.split("author = {", 1)[1], name
        assert re.search(r"eprint = \{\d{4}\.\d{5}\}|url\{https://", first), name
    assert METHODS["cdpo"].citation[0] in citations({"method": "dpo", "label_smoothing": 0.1})
    assert citations({"method": "robust", "label_smoothing": 0.1}) == list(METHODS["robust"].citation)
    assert len(citations({"method": "ppo", "kl_target": 6.0})) == 3  # PPO, InstructGPT, the adaptive KL


@pytest.fixture(scope="module")
def evaluated(run) -> dict:
    """A real `prefalign eval` of the run (a 4-item arithmetic suite), then `prefalign card RUN`."""
    root, out = run["root"], run["out"]
    held = write_jsonl(root / "held.jsonl", held_out_pairs(learnable_pairs(24), 8))
    suite = root / "tiny-arithmetic.yaml"
    suite.write_text(yaml.safe_dump({"name": "tiny-arithmetic", "data": str(ARITHMETIC), "limit": 4,
                                     "prompt": "Question: {question}\nAnswer:", "scorer": "exact_number",
                                     "max_new_tokens": 4}))
    assert prefalign("eval", "--model", out / "final", "--data", held, "--judge", f"{REWARDS}:length", "--suite",
                     suite, "-o", out / "eval", "max_new_tokens=4", "max_prompts=4", "--no-progress") == 0
    assert prefalign("card", out) == 0
    return {"card": (out / "final" / "README.md").read_text(), "eval": json.loads((out / "eval" / "eval.json")
                                                                                  .read_text())}


def test_a_later_eval_lands_on_the_card(run, evaluated):
    ev, card = evaluated["eval"], evaluated["card"]
    table = rows(section(card, "Evaluation"))
    assert table["preference accuracy"][:2] == [num(ev["preference_accuracy"]), num(ev["preference_accuracy_ci95"])]
    assert table["reward (mean ± std)"][:2] == [f"{num(ev['reward_mean'])} ± {num(ev['reward_std'])}",
                                               num(ev["reward_ci95"])]
    assert table["win-rate"][:2] == [num(ev["win_rate"]), num(ev["win_rate_ci95"])]
    assert table["KL(π‖π_ref) per sequence"][0] == num(ev["kl_per_sequence"])
    assert table["tiny-arithmetic"] == [num(ev["suites/tiny-arithmetic/score"]),
                                        num(ev["suites/tiny-arithmetic/score_reference"]), "4"]
    assert "Not evaluated yet" not in card and "Not measured" not in card
    # the rest of the card is as training left it
    assert ModelCard(card).data.to_dict() == ModelCard(run["card"]).data.to_dict()
    assert section(card, "Method") == section(run["card"], "Method")


def g4(x: float) -> str:
    """4 significant digits, written here rather than taken from the card code's own formatter."""
    return f"{x:.4g}"


def test_the_tables_hold_the_files_numbers_formatted_independently(run, evaluated, tmp_path):
    """Each cell against eval.json / run.json with this file's own formatting: units (GiB), the right key
    per row (per token vs per sequence, the model's perplexity, not the reference's), and lm-eval's tasks,
    whose suite names hold a slash (suites/lm-eval/<task>/...)."""
    ev, summary = evaluated["eval"], json.loads((run["out"] / "run.json").read_text())
    table = rows(section(evaluated["card"], "Evaluation"))
    assert table["preference accuracy"][0] == g4(ev["preference_accuracy"])
    assert table["KL(π‖π_ref) per token"][0] == g4(ev["kl_per_token"]) != g4(ev["kl_per_sequence"])
    assert table["perplexity"][0] == g4(ev["perplexity"]) and g4(ev["perplexity_reference"]) in table["perplexity"][2]
    cost = rows(section(evaluated["card"], "Cost"))
    assert cost["peak memory"][0].startswith(f"{g4(summary['peak_memory_bytes'] / 2**30)} GiB")
    assert cost["processes"][0] == str(summary["processes"])
    copy = shutil.copytree(run["out"], tmp_path / "lm")
    lm = {"suites/lm-eval/gsm8k/score": 0.25, "suites/lm-eval/gsm8k/score_reference": 0.5,
          "suites/lm-eval/gsm8k/n": 8, "suites/lm-eval/gsm8k/metric": "exact_match,strict-match",
          "suites/lm-eval/gsm8k/metrics": {"exact_match,strict-match": 0.25}}
    (copy / "eval" / "eval.json").write_text(json.dumps({**ev, "model": str(copy / "final"), **lm}))
    assert prefalign("card", copy) == 0
    suites = rows(section((copy / "final" / "README.md").read_text(), "Evaluation"))
    assert suites["lm-eval/gsm8k"] == ["0.25", "0.5", "8"] and "lm-eval" not in suites


def test_an_evaluation_of_another_model_is_refused(run, evaluated, tmp_path, capsys):
    other = tmp_path / "other-eval"
    other.mkdir()
    (other / "eval.json").write_text(json.dumps({**evaluated["eval"], "model": str(run["base"])}))
    assert prefalign("card", run["out"], "--eval", other, "-o", tmp_path / "x.md") == 2
    assert f"is an evaluation of {run['base']}, not of this run's" in capsys.readouterr().err
    (other / "eval.json").write_text(json.dumps({**evaluated["eval"], "model": "some-org/another-model"}))
    assert prefalign("card", run["out"], "--eval", other, "-o", tmp_path / "x.md") == 2  # a Hub id: another model
    assert not (tmp_path / "x.md").exists()
    # an earlier model's evaluation left in a run folder trained again: left off, with why
    again = shutil.copytree(run["out"], tmp_path / "again")
    ev = {**evaluated["eval"], "model": str(again / "final")}
    (again / "eval" / "eval.json").write_text(json.dumps(ev))
    os.utime(again / "eval" / "eval.json", (1e9, 1e9))
    assert prefalign("card", again) == 0
    text = section((again / "final" / "README.md").read_text(), "Evaluation")
    assert "is older than" in text and "Not evaluated yet" in text and "preference accuracy" not in text
    assert prefalign("card", again, "--eval", again / "eval") == 2
    assert prefalign("card", tmp_path / "nothing") == 2
    assert "no run.json" in capsys.readouterr().err


def test_a_mixture_gets_a_table_per_source_and_a_local_base_no_hub_id(run, tiny_models, tmp_path):
    from prefalign.report.card import metadata
    from prefalign.report.card_body import body
    from prefalign.report.card_sources import gather

    mixed = shutil.copytree(run["out"], tmp_path / "mixed", ignore=shutil.ignore_patterns("eval"))
    summary = json.loads((mixed / "run.json").read_text())
    summary["data_sources"] = [{"path": str(run["data"]), "split": None, "format": "auto", "weight": 0.75,
                                "available": 24, "used": 18},
                               {"path": "other-org/more-pairs@v1/train.jsonl", "split": None,
                                "format": "pairs", "weight": 0.25, "available": 40, "used": 6}]
    (mixed / "run.json").write_text(json.dumps(summary))
    config = yaml.safe_load((mixed / "config.yaml").read_text())  # a mixture's config lists its sources
    config["data"] = [{k: s[k] for k in ("path", "split", "format", "weight")} for s in summary["data_sources"]]
    (mixed / "config.yaml").write_text(yaml.safe_dump(config))
    assert prefalign("card", mixed) == 0
    text = (mixed / "final" / "README.md").read_text()
    table = rows(section(text, "Training data").split("Mixture (run.json `data_sources`):", 1)[1])
    assert table["path"] == ["split", "format", "weight", "available", "used"]
    assert table[str(run["data"])] == ["–", "auto", "0.75", "24", "18"]
    assert ModelCard(text).data.datasets == ["tiny-org/pairs", "other-org/more-pairs"]
    # the data statistics were measured at the end of training and are read back, not measured again
    assert "data_stats.json" in os.listdir(mixed) and "more-pairs" not in section(text, "Training data").split(
        "Mixture")[0]
    # a base model in a local folder is no Hub id: named in the body, not in base_model
    src = gather(mixed)
    src.config = {**src.config, "model": str(tiny_models["llama"])}
    assert hub_id(str(tiny_models["llama"])) is None and metadata(src).base_model is None
    assert f"`{tiny_models['llama']}` (a local folder)" in body(src)
