"""The Python API (prefalign/api.py): cheap `import prefalign`, typed configs whose errors name the key,
the CLI as a thin layer over the same functions, the notebook example run end to end, --version and
shell completion."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import prefalign
from conftest import learnable_pairs, write_jsonl
from prefalign import api
from prefalign.cli import app

ROOT = Path(__file__).parent.parent
LOSSES = ("loss", "rewards/margins", "rewards/accuracy", "logps/chosen", "logps/rejected", "grad_norm")


def test_import_prefalign_is_cheap_and_names_the_api():
    code = ("import sys, prefalign; heavy = sorted({'torch', 'transformers', 'peft', 'pydantic'} & set(sys.modules)); "
            "print(heavy, prefalign.__version__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["[]", prefalign.__version__]
    for name in set(prefalign.__all__) - {"__version__"}:  # every listed name resolves, to the API's own object
        assert getattr(prefalign, name) is getattr(api if name in api.__all__ else prefalign.errors, name), name
    assert set(api.__all__) <= set(prefalign.__all__)
    with pytest.raises(AttributeError, match="no attribute 'tarin'"):
        prefalign.tarin  # noqa: B018


def test_train_and_report_are_the_functions_whatever_was_imported_first():
    # the subpackages prefalign.train and prefalign.report are bound to the package when they load;
    # the API's names must still win, and the subpackages stay importable
    import prefalign.report.build  # noqa: F401
    import prefalign.train.methods  # noqa: F401
    from prefalign import report, train
    from prefalign.train import methods

    assert train is api.train and report is api.report and prefalign.train is api.train
    assert methods.DPO.__name__ == "DPO" and sys.modules["prefalign.train"].__name__ == "prefalign.train"
    with pytest.raises(AttributeError, match="patch prefalign.api.train"):
        prefalign.train = lambda cfg: None


def test_train_config_for_method_from_yaml_and_errors_that_name_the_key(tmp_path):
    from prefalign.train.methods import DPO, PPO, SimPO

    base = dict(model="m", data="d.jsonl", output="o")
    cfg = api.TrainConfig.for_method("simpo", **base, beta=3)
    assert type(cfg) is SimPO and isinstance(cfg, api.TrainConfig) and cfg.beta == 3.0 and cfg.simpo_gamma == 0.5
    bad = {"betta": "unknown key 'betta'; did you mean 'beta'?", "kl_coef": "'kl_coef' is a key of ppo, rloo, grpo",
           "beta": "beta: Input should be greater than 0"}
    for key, message in bad.items():
        with pytest.raises(prefalign.ConfigError, match=f"TrainConfig.for_method: .*{message}"):
            api.TrainConfig.for_method("dpo", **base, **{key: -1})
    with pytest.raises(prefalign.ConfigError, match="unknown method 'dpoo'.*did you mean 'dpo'"):
        api.TrainConfig.for_method("dpoo", **base)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": "dpo", **base, "max_steps": 7, "beta": 0.5, "lora": {"r": 4}}))
    # the file, then keywords, then key=value strings: later wins
    cfg = api.TrainConfig.from_yaml(path, ["lora.r=16", "beta=0.25"], max_steps=3, beta=0.9)
    assert type(cfg) is DPO and (cfg.max_steps, cfg.beta, cfg.lora.r) == (3, 0.25, 16)
    assert DPO.from_yaml(path).max_steps == 7
    with pytest.raises(prefalign.ConfigError, match="c.yaml: method dpo's config is DPO, not a PPO"):
        PPO.from_yaml(path)
    # a config built directly fails the same way: a ConfigError naming the key and the closest one
    with pytest.raises(prefalign.ConfigError, match="EvalConfig: unknown key 'max_prompt'; did you mean 'max_prompts'"):
        api.EvalConfig(model="m", output="o", max_prompt=3)
    with pytest.raises(prefalign.ConfigError, match="EvalConfig: model: Field required"):
        api.EvalConfig(output="o")
    with pytest.raises(prefalign.ConfigError, match="bare TrainConfig has no method"):
        api.train(api.TrainConfig(model="m", output="o"))


def test_load_preferences_keeps_good_records_and_counts_the_bad(tmp_path):
    rows = [json.dumps(r) for r in learnable_pairs(3)]
    rows += ["{not json", json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
             json.dumps({"prompt": "p", "chosen": "a"})]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(rows) + "\n")
    prefs = api.load_preferences(path)
    assert len(prefs) == 3 and [p.prompt for p in prefs] == [r["prompt"] for r in learnable_pairs(3)]
    assert prefs[0].chosen == learnable_pairs(3)[0]["chosen"] and prefs.invalid == 3
    assert [p.where.line for p in prefs.problems] == [4, 5, 6]
    assert sum(prefs.by_kind().values()) == 3 and "json" in prefs.by_kind() and "tie" in prefs.by_kind()
    with pytest.raises(prefalign.ConfigError, match="ranked"):
        api.load_preferences(path, ranked="best")


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """One DPO config trained twice, by `prefalign train FILE` and by api.train; the CLI's run evaluated and
    reported by the CLI, with every call the CLI made into the API recorded (a spy: the real functions run)."""
    root = tmp_path_factory.mktemp("api")
    data = write_jsonl(root / "pairs.jsonl", learnable_pairs(16))
    keys = {"method": "dpo", "model": str(tiny_models["llama"]), "data": str(data), "max_steps": 2, "batch_size": 4,
            "lora": True, "learning_rate": 0.01, "kl_every": 0}
    (root / "dpo.yaml").write_text(yaml.safe_dump({**keys, "output": str(root / "cli")}))
    calls = []
    mp = pytest.MonkeyPatch()
    for name in ("train", "evaluate", "report"):
        real = getattr(api, name)
        mp.setattr(api, name, lambda *a, _real=real, _name=name, **k: calls.append((_name, a, k)) or _real(*a, **k))
    runner = CliRunner()
    eval_args = ["--data", str(data), "max_new_tokens=4", "max_prompts=4", "--no-progress"]
    cli = [runner.invoke(app, ["train", str(root / "dpo.yaml"), "--no-progress"]),
           runner.invoke(app, ["eval", "--model", str(root / "cli" / "final"), "-o", str(root / "cli" / "eval"),
                               *eval_args]),
           runner.invoke(app, ["report", str(root / "cli"), "-o", str(root / "report")])]
    mp.undo()
    for result in cli:
        assert result.exit_code == 0, result.output
    trained = api.train(api.TrainConfig.for_method("dpo", **{**keys, "output": str(root / "api")}), log=None,
                        progress=False)
    return root, calls, trained


def test_the_cli_is_a_thin_layer_over_the_api(runs):
    root, calls, trained = runs
    assert [c[0] for c in calls] == ["train", "evaluate", "report"]
    (_, (cli_cfg,), _), (_, (cli_eval,), _), (_, (folders, out), _) = calls
    assert cli_cfg.model_dump() == {**trained.config.model_dump(), "output": str(root / "cli")}
    assert (cli_eval.model, cli_eval.max_prompts, cli_eval.max_new_tokens) == (str(root / "cli" / "final"), 4, 4)
    assert [Path(f) for f in folders] == [root / "cli"] and Path(out) == root / "report"
    # the same config, run both ways: the same losses, step by step, and the same scores
    cli_rows = [json.loads(x) for x in (root / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert len(cli_rows) == 2 and len(trained.metrics()) == 2
    for a, b in zip(cli_rows, trained.metrics(), strict=True):
        assert {k: a[k] for k in LOSSES} == {k: b[k] for k in LOSSES}


def test_results_are_what_the_run_wrote(runs):
    root, _, trained = runs
    assert trained.output == root / "api" and (trained.model / "adapter_config.json").exists()
    assert trained.summary == json.loads((root / "api" / "run.json").read_text()) and trained.summary["steps"] == 2
    scored = api.EvalResult(root / "cli" / "eval", json.loads((root / "cli" / "eval" / "eval.json").read_text()))
    assert 0 <= scored["preference_accuracy"] <= 1 and len(scored.samples()) == 4
    assert json.loads((root / "report" / "report.json").read_text())["runs"][0]["method"] == "dpo"
    # a mapping or a YAML file, with keyword overrides, is validated before any work
    with pytest.raises(prefalign.ConfigError, match="nothing to evaluate"):
        api.evaluate({"model": str(trained.model)}, output=str(root / "x"), log=None)
    with pytest.raises(prefalign.ConfigError, match="config: unknown key 'max_prompt'"):
        api.evaluate({"model": str(trained.model), "output": str(root / "x")}, max_prompt=3)
    (root / "e.yaml").write_text(yaml.safe_dump({"model": str(trained.model), "output": str(root / "x")}))
    with pytest.raises(prefalign.ConfigError, match="e.yaml: max_new_tokens: Input should be greater than or equal"):
        api.evaluate(root / "e.yaml", max_new_tokens=-1)
    with pytest.raises(prefalign.ConfigError, match="method dpo: unknown key 'betta'"):
        api.train({**trained.config.model_dump(), "betta": 1})
    # keyword overrides over a config object are applied (and validated) too, before any work
    with pytest.raises(prefalign.ConfigError, match="max_steps: Input should be greater than or equal to 1"):
        api.train(trained.config, max_steps=0)
    with pytest.raises(prefalign.ConfigError, match="max_new_tokens: Input should be greater than or equal"):
        api.evaluate(api.EvalConfig(model=str(trained.model), output=str(root / "x"), data="d"), max_new_tokens=-1)


def test_generate_is_seeded_and_takes_text_or_messages(runs):
    _, _, trained = runs
    prompts = ["I loved the movie", "I hated the plot"] * 4
    drawn = [api.generate(trained.model, prompts, max_new_tokens=6, seed=s) for s in (0, 0, 1)]
    assert len(drawn[0]) == 8 and drawn[0] == drawn[1] != drawn[2]
    greedy = api.generate(trained.model, prompts, max_new_tokens=6, temperature=0, batch_size=3)
    assert greedy[:2] * 4 == greedy  # greedy: a prompt's answer does not depend on its batch
    chat = api.generate(trained.model, [{"role": "user", "content": "hello"}], max_new_tokens=3, temperature=0)
    assert len(chat) == 1 and isinstance(chat[0], str)
    with pytest.raises(prefalign.ConfigError, match="top_p"):
        api.generate(trained.model, prompts, top_p=0)


def test_the_notebook_example_runs(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PREFALIGN_EXAMPLE_OUT", str(tmp_path))
    monkeypatch.setenv("PREFALIGN_EXAMPLE_STEPS", "2")
    monkeypatch.setenv("PREFALIGN_EXAMPLE_MODEL", str(tiny_models["llama"]))
    runpy.run_path(str(ROOT / "examples" / "python_api.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "128 training pairs, 0 unusable rows" in printed and "trained 2 steps" in printed
    assert printed.count("  before: ") == 3 and printed.count("  after:  ") == 3
    scores = json.loads((tmp_path / "dpo" / "eval" / "eval.json").read_text())
    assert f"'preference_accuracy': {round(scores['preference_accuracy'], 3)}" in printed
    assert (tmp_path / "report" / "report.html").exists()


def test_version_and_shell_completion():
    from prefalign.cli.version import version_line

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == version_line()
    import torch

    assert version_line().startswith(f"prefalign {prefalign.__version__} (torch {torch.__version__}, transformers ")
    env = {**os.environ, "_PREFALIGN_COMPLETE": "complete_bash", "COMP_WORDS": "prefalign data c", "COMP_CWORD": "2"}
    run = subprocess.run([sys.executable, "-m", "prefalign"], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.split() == ["check", "curate"], run.stdout + run.stderr
    shown = CliRunner().invoke(app, ["--show-completion", "bash"], prog_name="prefalign")
    assert "complete -o default -F _prefalign_completion prefalign" in shown.output


def test_extras_are_named_for_what_they_bring():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"gguf", "demo", "hf", "wandb", "mlflow", "trackio", "serve", "vllm", "deepspeed", "all"} <= set(extras)
    # all: every extra that pip installs on its own; vllm pins its own torch build and deepspeed's build
    # needs torch first (docs/install.md); dev is for working on prefalign
    (spec,) = extras["all"]
    assert set(spec.removeprefix("prefalign[").removesuffix("]").split(",")) == set(extras) - {
        "all", "vllm", "deepspeed", "dev"}
