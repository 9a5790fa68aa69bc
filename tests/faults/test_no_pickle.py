"""No code runs from a file prefalign reads (issue 16 §3): an AST scan of every .py it ships or runs
(src/prefalign, scripts/, benchmarks/) for what deserialises code or runs strings: pickle and its
kin, torch.load without weights_only=True, torch.save, numpy.load(allow_pickle=True), yaml's unsafe
loaders, eval/exec, shell=True, trust_remote_code=True written in, and imports of a module named at
run time. What is there on purpose is in ALLOWED, each with its reason; the list is closed both ways
(a finding not in it fails, and so does an entry that no longer matches anything)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = [ROOT / "src" / "prefalign", ROOT / "scripts", ROOT / "benchmarks"]
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
SAFE_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}

# (file, rule) -> why it is there. A reason that says "removed by the ckpt branch" may go stale.
ALLOWED = {
    ("src/prefalign/tasks/stages.py", "import pickle"):
        "pickle.dumps of the caller's own log callable, in memory, only to ask whether multiprocessing "
        "(which pickles whatever it sends a child) can send it; nothing is ever read from a file",
    ("src/prefalign/train/checkpoint.py", "torch.save"):
        "state.pt of the old checkpoint format: removed by the ckpt branch (safetensors + JSON)",
    ("src/prefalign/judges/__init__.py", "dynamic import"):
        "the reward/judge MODULE:FUNCTION or FILE.py:FUNCTION: the user's own code, by design, named only "
        "in the config or on the command line (tests/faults/test_injection.py checks a data file cannot)",
    ("src/prefalign/train/trackers.py", "dynamic import"):
        "a tracker's package, from the fixed table PACKAGES (the config names a tracker, not a module)",
}


def _name(node: ast.AST) -> str:
    """Dotted name of a Name/Attribute chain ('torch.load', 'yaml.load'), '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _call_rules(call: ast.Call) -> list[str]:
    name = _name(call.func)
    last = name.rsplit(".", 1)[-1]
    found = []
    if name in ("torch.load", "torch.serialization.load") and not _is_true(_kw(call, "weights_only")):
        found.append("torch.load without weights_only=True")
    if name in ("torch.save", "torch.serialization.save"):
        found.append("torch.save")
    if name in ("torch.jit.load", "pd.read_pickle", "pandas.read_pickle") or last in ("read_pickle", "to_pickle"):
        found.append(f"{name or last}: a pickle")
    if name in ("np.load", "numpy.load") and _is_true(_kw(call, "allow_pickle")):
        found.append("numpy.load(allow_pickle=True)")
    if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
        found.append(name)
    if name in ("yaml.load", "yaml.load_all"):
        loader = _kw(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
        if loader is None or _name(loader).rsplit(".", 1)[-1] not in SAFE_LOADERS:
            found.append(f"{name} without a safe Loader")
    if name in ("eval", "exec", "compile", "__import__"):
        found.append(f"{name}()")
    if name in ("os.system", "os.popen") or _is_true(_kw(call, "shell")):
        found.append("a shell command")
    if _is_true(_kw(call, "trust_remote_code")):
        found.append("trust_remote_code=True")
    if name in ("importlib.import_module", "import_module") and call.args:
        target = call.args[0]
        if isinstance(target, ast.Constant) and str(target.value).split(".")[0] in PICKLERS:
            found.append(f"import {target.value}")
        elif not isinstance(target, ast.Constant) and not _constant_choice(target):
            found.append("dynamic import")
    if last in ("spec_from_file_location", "exec_module"):
        found.append("dynamic import")
    return found


def _constant_choice(node) -> bool:
    """`"a" if cond else "b"`: still one of two modules written in the source."""
    return isinstance(node, ast.IfExp) and all(isinstance(x, ast.Constant) for x in (node.body, node.orelse))


def findings(source: str) -> list[tuple[int, str]]:
    """(line, rule) for each thing in `source` that could run code read from a file."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLERS:
            out.append((node.lineno, f"import {node.module}"))
        elif isinstance(node, ast.Call):
            out += [(node.lineno, rule) for rule in _call_rules(node)]
        elif isinstance(node, ast.Dict):  # {"trust_remote_code": True, ...} handed to from_pretrained
            out += [(node.lineno, "trust_remote_code=True") for k, v in zip(node.keys, node.values, strict=True)
                    if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and _is_true(v)]
        elif isinstance(node, ast.Attribute) and node.attr in ("Loader", "UnsafeLoader", "FullLoader") \
                and _name(node.value) == "yaml":
            out.append((node.lineno, f"yaml.{node.attr}"))
    return out


def scan() -> dict[tuple[str, str], list[int]]:
    found: dict[tuple[str, str], list[int]] = {}
    for folder in SCANNED:
        for file in sorted(folder.rglob("*.py")):
            rel = file.relative_to(ROOT).as_posix()
            for line, rule in findings(file.read_text(encoding="utf-8")):
                found.setdefault((rel, rule), []).append(line)
    return found


def test_nothing_deserialises_or_runs_code_from_a_file():
    found = scan()
    assert len(list(SCANNED[0].rglob("*.py"))) > 100  # the scan sees the package
    unexplained = {f"{file}:{lines[0]}: {rule}" for (file, rule), lines in found.items()
                   if (file, rule) not in ALLOWED}
    assert not unexplained, "code that could run what a file holds (see ALLOWED for the exceptions):\n" + \
        "\n".join(sorted(unexplained))
    stale = [key for key, why in ALLOWED.items() if key not in found and "removed by the ckpt branch" not in why]
    assert not stale, f"ALLOWED entries that match nothing any more (take them out): {stale}"


# each rule seen to fire on the smallest source that breaks it (and not on its safe twin)
CASES = [
    ("import pickle\n", "import pickle"), ("from dill import loads\n", "import dill"),
    ("import joblib.numpy_pickle\n", "import joblib.numpy_pickle"), ("import cloudpickle\n", "import cloudpickle"),
    ("torch.load(f)\n", "torch.load without weights_only=True"),
    ("torch.load(f, weights_only=False)\n", "torch.load without weights_only=True"),
    ("torch.save(x, f)\n", "torch.save"), ("np.load(f, allow_pickle=True)\n", "numpy.load(allow_pickle=True)"),
    ("yaml.load(s)\n", "yaml.load without a safe Loader"),
    ("yaml.load(s, Loader=yaml.FullLoader)\n", "yaml.load without a safe Loader"),
    ("yaml.unsafe_load(s)\n", "yaml.unsafe_load"), ("eval(row['expr'])\n", "eval()"), ("exec(code)\n", "exec()"),
    ("subprocess.run(cmd, shell=True)\n", "a shell command"), ("os.system(cmd)\n", "a shell command"),
    ("load(p, trust_remote_code=True)\n", "trust_remote_code=True"),
    ("kw = {'trust_remote_code': True}\n", "trust_remote_code=True"),
    ("importlib.import_module(row['reward'])\n", "dynamic import"),
    ("importlib.import_module('pickle')\n", "import pickle"), ("pd.read_pickle(f)\n", "pd.read_pickle: a pickle"),
]
SAFE = ["torch.load(f, weights_only=True)\n", "np.load(f)\n", "yaml.load(s, Loader=yaml.SafeLoader)\n",
        "yaml.safe_load(s)\n", "model.eval()\n", "re.compile(p)\n", "load(p, trust_remote_code=cfg.trust)\n",
        "importlib.import_module('prefalign.api')\n", "subprocess.run([sys.executable, '-c', code])\n"]


def test_each_rule_fires_and_safe_code_passes():
    for source, rule in CASES:
        assert rule in [r for _, r in findings(source)], source
    for source in SAFE:
        assert findings(source) == [], source
