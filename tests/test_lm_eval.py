"""`prefalign eval --lm-eval`: a local lm-evaluation-harness task (a YAML over a local JSONL, nothing
downloaded) scored for the model and its reference, checked against the harness's own result on the
same weights; the offline and not-installed errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from prefalign.eval.evaluate import EvalConfig, evaluate

SHIPPED = Path(__file__).resolve().parent.parent / "src" / "prefalign" / "assets" / "imdb-lm"
TASK = "prefalign_sentiment_mc"

# a cloze the shipped IMDB model should do better on than a random one; every choice is one token
ITEMS = [("I loved this movie. It was", [" great", " terrible"], 0),
         ("What a waste of time. The film was", [" wonderful", " awful"], 1),
         ("The acting was superb and the story was", [" bad", " good"], 1),
         ("I hated every minute. It was", [" boring", " fun"], 0),
         ("A beautiful film, truly", [" wonderful", " terrible"], 0),
         ("The worst movie I have ever seen. So", [" good", " bad"], 1),
         ("My family enjoyed it, a really", [" fun", " boring"], 0),
         ("The plot made no sense and the ending was", [" great", " awful"], 1)]


def task_yaml(name: str, data: str, extra: str = "") -> str:
    return (f"task: {name}\n{data}test_split: test\noutput_type: multiple_choice\n"
            "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n" + extra)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    data = write_jsonl(root / "items.jsonl", [{"question": q, "choices": c, "answer": a} for q, c, a in ITEMS])
    # cache_dir: datasets' arrow copy of the file stays in the test's folder, not in ~/.cache
    (root / f"{TASK}.yaml").write_text(task_yaml(TASK, f"dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                                      f"    test: {data}\n  cache_dir: {root / 'cache'}\n"))
    # a task over a hub data set: offline it must fail with a clear message, never download
    (root / "hub_task.yaml").write_text(task_yaml("prefalign_hub_mc", "dataset_path: prefalign-nobody/no-such-set\n"))
    return root


@pytest.fixture(scope="module")
def random_reference(tmp_path_factory) -> Path:
    """A random-init tiny Llama with the shipped model's tokenizer: a reference unlike the policy."""
    from prefalign.models.load import load_tokenizer_for
    from prefalign.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("ref") / "llama", "llama", load_tokenizer_for(SHIPPED), hidden=32)


LIMIT = 6  # --lm-eval-limit: the first 6 of the 8 items


def harness_direct(path: Path, tasks: Path) -> dict:
    """The harness's own result on the same weights, loaded afresh (the reference implementation)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from prefalign.models.load import load_model, load_tokenizer_for

    lm = HFLM(pretrained=load_model(path).eval(), tokenizer=load_tokenizer_for(SHIPPED), batch_size=16)
    out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(tasks),
                                  include_defaults=False), limit=LIMIT, log_samples=False)
    return {k: v for k, v in out["results"][TASK].items() if "," in k}


@pytest.fixture(scope="module")
def direct(tasks, random_reference) -> dict[str, dict]:
    return {"shipped": harness_direct(SHIPPED, tasks), "random": harness_direct(random_reference, tasks)}


def test_a_local_task_for_the_model_and_its_reference(tasks, random_reference, direct, tmp_path):
    from typer.testing import CliRunner

    from prefalign.cli import app
    from prefalign.report.build import load_run, summarise
    from test_metric_docs import documented, undocumented

    run = CliRunner().invoke(app, ["eval", "--model", str(SHIPPED), "--reference", str(random_reference),
                                   "--lm-eval", TASK, "--lm-eval-include", str(tasks), "--lm-eval-limit", str(LIMIT),
                                   "-o", str(tmp_path), "--no-progress"])
    assert run.exit_code == 0, run.output
    res = json.loads((tmp_path / "eval.json").read_text())
    key = f"suites/lm-eval/{TASK}"
    assert res[f"{key}/metric"] == "acc,none" and res[f"{key}/n"] == res[f"{key}/n_reference"] == LIMIT
    for who, model in (("", "shipped"), ("_reference", "random")):
        assert res[f"{key}/score{who}"] == direct[model]["acc,none"]
        assert res[f"{key}/score_stderr{who}"] == direct[model]["acc_stderr,none"]
        assert res[f"{key}/metrics{who}"] == direct[model]
    # the two models score differently, so the reference's numbers above are its own
    assert direct["shipped"] != direct["random"]
    assert undocumented(res, documented()) == set()
    row = summarise(load_run(tmp_path))  # the report's row: both scores beside the other columns
    assert row[f"{key}/score"] == res[f"{key}/score"] and row[f"{key}/score_reference"] == res[f"{key}/score_reference"]


def test_a_model_against_itself_is_scored_once(tasks, direct, tmp_path):
    res = evaluate(EvalConfig(model=str(SHIPPED), reference=str(SHIPPED), lm_eval=TASK, lm_eval_include=str(tasks),
                              lm_eval_limit=LIMIT, output=str(tmp_path)), log=lambda _: None, progress=False)
    key = f"suites/lm-eval/{TASK}"
    assert res[f"{key}/metrics"] == res[f"{key}/metrics_reference"] == direct["shipped"]


def test_without_lm_eval_installed_the_error_names_the_extra(monkeypatch, tmp_path):
    from prefalign.errors import ConfigError

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError, as when absent
    with pytest.raises(ConfigError, match=r"pip install 'prefalign\[lmeval\]'"):
        evaluate(EvalConfig(model=str(SHIPPED), lm_eval=["hellaswag"], output=str(tmp_path / "e")),
                 log=lambda _: None, progress=False)
    assert not (tmp_path / "e").exists()  # failed before anything was loaded or written


def test_offline_a_hub_task_fails_clearly_and_downloads_nothing(tasks, tmp_path):
    """In a fresh process, as `prefalign` sets it (HF_HUB_OFFLINE is read when datasets is imported):
    the task's data set is looked for before any model loads, and offline that is a clear error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys\nfrom prefalign.eval import harness\nfrom prefalign.errors import ConfigError\n"
            f"try:\n    harness.task_manager(['prefalign_hub_mc'], [{str(tasks)!r}])\n"
            "except ConfigError as e:\n    print(e)\n    sys.exit(2)\n")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stdout.startswith("lm-eval task(s) prefalign_hub_mc: a data set could not be fetched")
    assert "OfflineModeIsEnabled" in run.stdout and "HF_HUB_OFFLINE=1" in run.stdout
    assert not list((tmp_path / "hf").rglob("*.arrow"))  # nothing was fetched into the cache
