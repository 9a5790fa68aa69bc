"""The method registry (train/methods.py): one entry per method, configs typed per method, losses
taking exactly their hyperparameters, help from the types, and no dispatch anywhere else."""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import learnable_pairs, write_jsonl
from prefalign.config import ConfigError
from prefalign.feedback.iterate import IterateConfig
from prefalign.losses.preference import simpo
from prefalign.tasks.study import StudyConfig
from prefalign.train.help import config_help
from prefalign.train.methods import METHODS, make_config, own_keys

SRC = Path(__file__).resolve().parent.parent / "src" / "prefalign"
OFFLINE = [m for m, spec in METHODS.items() if spec.trainer == "offline"]
RL = [m for m, spec in METHODS.items() if spec.trainer == "rl"]
# applied around every paired loss by the trainer (RPO), or read by the data's tokenization (SFT's
# assistant_turns: which tokens are completions), not parameters of the loss itself
AROUND_THE_LOSS = {"rpo_alpha", "assistant_turns"}


@pytest.mark.parametrize("name", OFFLINE)
def test_an_offline_loss_takes_exactly_its_methods_hyperparameters(name):
    spec = METHODS[name]
    assert set(own_keys(spec.config)) - AROUND_THE_LOSS == set(spec.hyperparameters), name
    # the config's defaults are the loss's own (the paper's), not a second set of numbers
    params = inspect.signature(spec.loss).parameters
    defaults = {k: spec.config.model_fields[k].default for k in spec.hyperparameters}
    assert defaults == {k: params[k].default for k in spec.hyperparameters}, name


@pytest.mark.parametrize("name", RL)
def test_an_rl_estimator_reads_only_keys_its_config_has(name):
    spec = METHODS[name]
    fields = spec.config.model_fields
    assert set(spec.hyperparameters) <= set(fields), name
    params = inspect.signature(spec.advantages).parameters
    for k in set(spec.hyperparameters) - {"kl_coef"}:
        assert fields[k].default == params[k].default, (name, k)


def test_a_key_of_another_method_is_an_error_naming_the_methods_own_keys():
    base = dict(model="m", data="d", output="o")
    with pytest.raises(ConfigError, match=r"'gamma' was renamed: simpo_gamma \(simpo\) or gae_gamma \(ppo\).*"
                                          r"dpo's own keys: rpo_alpha, beta, label_smoothing"):
        make_config(method="dpo", gamma=1, **base)
    with pytest.raises(ConfigError, match="'simpo_gamma' is a key of simpo, not of dpo"):
        make_config(method="dpo", simpo_gamma=1, **base)
    with pytest.raises(ConfigError, match="'label_smoothing' is a key of dpo, cdpo, robust, not of simpo"):
        make_config(method="simpo", label_smoothing=0.1, **base)
    with pytest.raises(ConfigError, match="'whiten_advantages' is a key of ppo, rloo, not of grpo"):
        make_config(method="grpo", whiten_advantages=True, model="m", output="o", prompts="p", reward="r")
    with pytest.raises(ConfigError, match="unknown method 'simpoo'.*did you mean 'simpo'"):
        make_config(method="simpoo", **base)


def test_each_method_gets_its_papers_defaults():
    base = dict(model="m", data="d", output="o")
    assert make_config(method="simpo", **base).beta == 2.0  # not DPO's 0.1
    assert make_config(method="cdpo", **base).label_smoothing == 0.1
    assert make_config(method="dpo", **base).label_smoothing == 0.0
    rl = dict(model="m", output="o", prompts="p", reward="r")
    assert make_config(method="grpo", **rl).kl_penalty == "loss_k3"
    assert make_config(method="rloo", **rl).samples_per_prompt == 4
    assert make_config(method="ppo", **rl).samples_per_prompt == 1
    # and the loss is computed with them
    t = {k: torch.tensor([v]) for k, v in dict(policy_chosen_logps=-4.0, policy_rejected_logps=-9.0,
                                               chosen_lengths=2.0, rejected_lengths=3.0).items()}
    cfg = make_config(method="simpo", **base)
    loss, _ = METHODS["simpo"].compute({**t, "ref_chosen_logps": t["chosen_lengths"]}, cfg)
    assert torch.allclose(loss, simpo(**t, beta=2.0, simpo_gamma=0.5)[0])
    assert not torch.allclose(loss, simpo(**t, beta=0.1, simpo_gamma=0.5)[0])


def test_embedded_train_configs_are_validated_before_any_work():
    with pytest.raises(ValueError, match="'gamma' was renamed"):
        IterateConfig(model="m", prompts="p", judge="j", output="o", train={"gamma": 1.0})
    with pytest.raises(ValueError, match="kto cannot"):
        IterateConfig(model="m", prompts="p", judge="j", output="o", train={"method": "kto"})
    with pytest.raises(ValueError, match="run ppo-kl0.1: .*unknown key 'ppo_epoch'; did you mean 'ppo_epochs'"):
        StudyConfig(output="o", ppo_kl_coefs=[0.1], ppo={"ppo_epoch": 2})


def test_help_comes_from_the_config_types():
    text = config_help("simpo")
    for key in ("beta", "simpo_gamma", "rpo_alpha"):
        field = METHODS["simpo"].config.model_fields[key]
        assert key in text and field.description in text and repr(field.default) in text
    # every field of every method's config says what it is
    for name, spec in METHODS.items():
        missing = [k for k, f in spec.config.model_fields.items() if k != "method" and not f.description]
        assert not missing, (name, missing)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefalign", *args], capture_output=True, text=True)


def test_cli_method_help_and_errors(tiny_models, tmp_path):
    shown = _cli("train", "--method", "simpo", "--help")
    assert shown.returncode == 0 and "simpo_gamma" in shown.stdout and "target reward margin" in shown.stdout
    # the method's keys (what `config show` prints), then train's own flags
    assert shown.stdout.startswith(_cli("config", "show", "simpo").stdout) and "--model" in shown.stdout
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(8))
    bad = _cli("train", "--method", "dpo", "--model", str(tiny_models["llama"]), "--data", str(data),
               "-o", str(tmp_path / "bad"), "gamma=1")
    assert bad.returncode == 2 and "dpo's own keys: rpo_alpha, beta, label_smoothing" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
    ok = _cli("train", "--method", "simpo", "--model", str(tiny_models["llama"]), "--data", str(data),
              "-o", str(tmp_path / "simpo"), "max_steps=1", "kl_every=0", "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load((tmp_path / "simpo" / "config.yaml").read_text())["beta"] == 2.0


def _mentions_method(node) -> bool:
    """cfg.method, method, run["method"]: something named method."""
    return any(isinstance(n, ast.Attribute) and n.attr == "method" or isinstance(n, ast.Name) and n.id == "method"
               or isinstance(n, ast.Constant) and n.value == "method" for n in ast.walk(node))


def test_no_method_dispatch_outside_the_registry():
    """No method-name tests (`cfg.method == "ppo"`, `method in ("ppo", "rloo")`, `RL_METHODS = (...)`)
    anywhere but train/methods.py: callers ask the registry what a method is."""
    names = set(METHODS)
    found = []
    for path in SRC.rglob("*.py"):
        if path.name == "methods.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            consts = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
            if isinstance(node, ast.Compare) and names & consts and _mentions_method(node):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
            targets = node.targets if isinstance(node, ast.Assign) else []
            if any(isinstance(t, ast.Name) and "METHOD" in t.id for t in targets) and names & consts:
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not found, found


def test_docs_key_table_matches_the_configs():
    """docs/methods.md's method table lists each offline method's own keys, checked against the config classes."""
    page = (SRC.parent.parent / "docs" / "methods.md").read_text()
    table = page[page.index("| method | loss (per example) | needs | own keys |"):]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("| `"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[0].strip("`")] = {k.strip("` ") for k in cells[-1].split(",")} - {"–"}
    assert set(rows) == set(OFFLINE)
    for name, keys in rows.items():
        assert keys == set(own_keys(METHODS[name].config)), name
