"""Random YAML through every config loader: `prefalign train CONFIG.yaml` (load_train_config, what the command
calls; plan, sample and iterate read the same way), recipes, `prefalign eval CONFIG.yaml` (EvalConfig) and
task suites. Random scalars and types in known keys, unknown keys, keys that are not text, nesting, anchors
and aliases (a 'billion laughs'), merge keys, lists where mappings belong, huge numbers, .nan/.inf, empty and
multiple documents, tags (!!binary, !!set, !!python/...), files that are not UTF-8.

Whatever the file holds, loading it gives a config or a ConfigError whose first line names the file (and an
unknown key by name), in a message of bounded length: never a traceback. A UTF-8 BOM changes nothing.
"""

from __future__ import annotations

import re
import sys

import hypothesis.strategies as st
import pytest
import yaml
from faultkit import tally
from fuzzkit import Runs, fuzz_settings
from hypothesis import given

from prefalign.config import load_config
from prefalign.errors import ConfigError
from prefalign.eval.evaluate import EvalConfig
from prefalign.eval.suites import Suite, load_suite
from prefalign.train.config import LoraSettings
from prefalign.train.methods import METHODS, load_train_config
from prefalign.train.recipe import load_recipe

KIND = "fuzzed config"
MAX_MESSAGE = 20_000  # characters: a config error is read by a person

KNOWN = sorted({*METHODS["dpo"].config.model_fields, *METHODS["ppo"].config.model_fields, *EvalConfig.model_fields,
                *Suite.model_fields, *LoraSettings.model_fields, "path", "weight", "fraction", "stages"})
UNKNOWN = ["bogus", "learning-rate", "Model", "stage", "lora_rank"]
NOT_TEXT = [1, 0, -1, 2.5, True, False, None]
METHOD = st.sampled_from(["dpo", "ppo", "grpo", "kto", "sft", "simpo", "nope"])

SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(-10**30, 10**30), st.floats(),  # nan, inf, 1e308
    st.text(max_size=6), st.binary(max_size=4),  # !!binary
    st.dates(), st.sampled_from(["", "dpo", "m", "out", "x.jsonl", "${dpo}", "${nope}", "wandb,wandb", "a:b", "\ud800",
                                 "tensorboard", "auto", "1e400", "{name}", "{", "~"]))
KEY = st.one_of(st.sampled_from(KNOWN), st.sampled_from(UNKNOWN), st.sampled_from(NOT_TEXT))
VALUE = st.recursive(SCALAR, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(KEY, c, max_size=3),
                                                 st.frozensets(st.integers(0, 3), max_size=2)), max_leaves=8)


@st.composite
def document(draw) -> dict:
    """A mapping of config keys; one value shared by two keys, which yaml writes as an anchor and an alias."""
    doc = draw(st.dictionaries(KEY, VALUE, max_size=6))
    if draw(st.booleans()):
        doc["method"] = draw(METHOD)
    if draw(st.booleans()):
        shared = draw(st.lists(VALUE, min_size=1, max_size=2))
        for k in draw(st.lists(KEY, min_size=2, max_size=3)):
            doc[k] = shared
    return doc


def laughs(depth: int, key: str) -> str:
    """Anchors of 9 aliases of the one before: tiny to load, 9**depth leaves to print."""
    items = ["&l0 [x, x, x, x, x, x, x, x, x]"] + [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]"
                                                  for i in range(1, depth)]
    return f"{key}: [{', '.join(items)}]\n"


SNIPPETS = st.one_of(st.sampled_from([
    "", "---\n", "---\nmodel: a\n---\nmodel: b\n", "~\n", "[]\n", "- model\n", "42\n", "just text\n",
    "x: !!python/object/apply:os.system [echo]\n", "base: &b {beta: 0.1, lora: true}\n<<: *b\n",
    "<<: [*undefined]\n", "? [a, b]\n: 1\n", "a: &a [*a]\n", "model: m\nmodel: n\n", "\t- tab\n", "'unclosed\n",
    "beta: .nan\n", "beta: -.inf\n", "max_steps: 1e400\n", "max_steps: 0x_ff\n", "lora: {r: [1]}\n", "method: [dpo]\n",
    "method: {a: 1}\n", "stages: [dpo]\n", "stages: {1: {method: dpo}}\n", "data: [{path: d, weight: .inf}]\n",
    "eval_data: {'bad name': d}\n", "report_to: none,wandb\n", "seed: !!float 1\n", "max_steps: !!binary AAAA\n",
    "output: !!timestamp 2001-12-14\n"]),
    st.builds(laughs, st.integers(2, 9), st.sampled_from(["report_to", "model", "bogus", "lora", "stages"])),
    st.integers(100, 800).map(lambda d: "model: " + "[" * d + "]" * d + "\n"),  # PyYAML scans it in d**2
    st.integers(100, 600).map(lambda d: "".join("  " * i + "a:\n" for i in range(d))))  # ~3 frames a level


def recipe(doc: dict, wrap: bool) -> dict:
    return {"output": "runs/r", "stages": {"dpo": doc, "ppo": {"method": "ppo", "model": "${dpo}"}}} if wrap else doc


def dump(doc) -> str:
    try:
        return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    except yaml.YAMLError:  # a value safe_dump has no tag for
        return ""


def encode(text: str, encoding: str, at: int) -> bytes:
    if encoding == "junk":  # bytes no encoding reads as this text
        data = text.encode("utf-8", "surrogatepass")
        return data[:at % (len(data) + 1)] + b"\xff\xc3\x28" + data[at % (len(data) + 1):]
    return text.encode(encoding, "surrogatepass" if encoding.startswith("utf") else "replace")


def loaders(path):
    return {"train": lambda: load_train_config(path, []), "recipe": lambda: load_recipe(path),
            "eval": lambda: load_config(EvalConfig, path), "suite": lambda: load_suite(str(path))}


def outcome(load, path, *named) -> tuple[str, str]:
    """('ok', the config) or ('error', the message); the property's checks on the message: it starts with
    the file at fault (the YAML, or a file it `named`). Anything else raised is the bug this test exists
    for: it propagates."""
    try:
        return "ok", repr(load())
    except ConfigError as e:
        message = str(e)
        assert message.startswith(tuple(f"{p}:" for p in (path, *named))), message[:500]
        assert len(message) < MAX_MESSAGE, f"{len(message)} characters"
        return "error", message


@pytest.mark.parametrize("target", ["train", "recipe", "eval", "suite"])
def test_random_yaml_is_a_config_or_a_clear_error(tmp_path, target):
    runs = Runs(KIND)
    (tmp_path / "items.jsonl").write_text('{"question": "1+1", "answer": "2"}\n[1]\n{"answer": {}}\n')

    @fuzz_settings(25, 600)
    @given(document(), SNIPPETS, st.sampled_from(["start", "end"]), st.booleans(),
           st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1", "junk"]), st.integers(0, 10**6))
    def prop(doc, snippet, where, wrap, encoding, at):
        with runs.example():
            if target == "suite" and "data" in doc:
                doc["data"] = "items.jsonl"
            body = dump(recipe(doc, wrap and target == "recipe"))
            text = snippet + body if where == "start" else body + snippet
            path = tmp_path / f"{target}.yaml"
            path.write_bytes(encode(text, encoding, at))
            load = loaders(path)[target]
            got = outcome(load, path, tmp_path / "items.jsonl")
            if encoding == "utf-16":
                assert got[0] == "error" and "not UTF-8" in got[1]
            if encoding == "utf-8-sig":  # a BOM (Notepad's) changes nothing
                path.write_bytes(encode(text, "utf-8", at))
                assert outcome(load, path, tmp_path / "items.jsonl") == got
            method = doc.get("method", "dpo")
            plain = not snippet and body and encoding == "utf-8" and isinstance(method, str) and method in METHODS
            unknown = [k for k in doc if k in UNKNOWN]
            if plain and unknown and target in ("train", "eval"):  # the key is named, whatever else is wrong
                assert got[0] == "error" and all(f"'{k}'" in got[1] for k in unknown), (unknown, got)

    runs.run(prop)


def test_random_overrides_are_a_config_or_a_clear_error():
    runs = Runs(KIND)
    part = st.sampled_from(["model", "output", "data", "lora", "r", "beta", "stages", "", " ", ".", "x"])
    raw = st.one_of(st.text(max_size=8), st.sampled_from(["[", "{a: 1", "[[[[[[", "*a", "&a [*a]", "!!binary AA",
                                                          ".nan", "1e400", "null", "[" * 800]))
    override = st.one_of(st.tuples(st.lists(part, min_size=1, max_size=3), raw).map(
        lambda t: ".".join(t[0]) + "=" + t[1]), st.text(max_size=8))

    @fuzz_settings(40, 1000)
    @given(st.lists(override, max_size=5))
    def prop(overrides):
        with runs.example():
            try:
                load_train_config(None, ["model=m", "output=o", "data=d.jsonl", *overrides])
            except ConfigError as e:
                assert len(str(e)) < MAX_MESSAGE

    runs.run(prop)


# ---------------------------------------------------------------- the crashes the properties found, pinned

FOUND = {  # file text -> what the one-line error says (each raised TypeError, UnicodeDecodeError,
    # RecursionError or hung before the fix)
    "1: null\nmodel: m\n": "unknown key '1'",  # difflib.get_close_matches(1, ...): TypeError
    "method: [dpo]\n": "unknown method [",  # `name not in METHODS`: unhashable list
    "method: null\n": "unknown method None",
    "model: " + "[" * 600 + "]" * 600 + "\n": "nested too deeply",  # PyYAML's composer: RecursionError
    # accepted, and trained on NaN:
    "method: simpo\nmodel: m\noutput: o\ndata: d\nsimpo_gamma: .nan\n": "simpo_gamma: NaN is no value",
    "model: m\noutput: o\ndata: [{path: d, weight: .inf}]\n": "data[0].weight",  # passed; Fraction(inf) at run time
}


@pytest.mark.parametrize("text,says", list(FOUND.items()))
def test_found_crashes_are_one_line_errors(tmp_path, text, says, monkeypatch, capsys):
    """Through the command line's own error handling (prefalign.cli.main): exit 2, 'error: FILE: ...'."""
    from prefalign.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(text)
    monkeypatch.chdir(tmp_path)  # should a config pass after all, the run it starts writes here, not in the checkout
    monkeypatch.setattr(sys, "argv", ["prefalign", "train", str(path)])
    code = None
    try:
        main()
    except SystemExit as e:
        code = e.code
    finally:
        err = capsys.readouterr().err
        tally(KIND, survived=code == 2 and says in err, detail=text[:60])
    assert code == 2 and err.startswith(f"error: {path}") and says in err and "Traceback" not in err


def test_not_utf8_billion_laughs_and_recipe_shapes(tmp_path):
    held = False
    try:
        pinned_files(tmp_path)
        held = True
    finally:
        tally(KIND, survived=held, count=3 * 4 + 4, detail="not UTF-8, UTF-16, billion laughs; recipe shapes")


def pinned_files(tmp_path):
    for data, says in ((b"model: caf\xe9\n", "not UTF-8 text (byte 0xe9"), (b"\xff\xfem\x00", "not UTF-8"),
                       (laughs(9, "report_to").encode(), "report_to[0]")):
        path = tmp_path / "c.yaml"
        path.write_bytes(data)
        for target, load in loaders(path).items():
            with pytest.raises(ConfigError) as e:
                load()
            assert str(e.value).startswith(str(path)) and len(str(e.value)) < MAX_MESSAGE
            if target == "train":
                assert says in str(e.value)
    for text, says in (("- a\n", "a recipe is"), ("output: [o]\nstages: {}\n", "a recipe is"),
                       ("output: o\nstages: {1: {method: dpo}}\n", "stage 1: a stage's name is text"),
                       ("output: o\n1: x\nstages: {}\n", "unknown keys ['1']")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: .*{re.escape(says)}"):
            load_recipe(path)
