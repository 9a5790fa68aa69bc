"""No code runs from a file prefalign reads (issue 16 §3): an AST scan of every .py it ships or runs
(src/prefalign, scripts/, benchmarks/) for what deserialises code or runs strings: pickle and its
kin, torch.load without weights_only=True, torch.save, torch.hub, numpy.load with allow_pickle,
yaml's unsafe loaders, eval/exec, runpy, shells and os.exec*/spawn*, trust_remote_code=True or
use_safetensors=False written in, and imports of a module named at run time.

Names are resolved through the file's imports and simple assignments (`import torch as T`,
`from torch.serialization import load as L`, `L2 = T.load`, `getattr(torch, "load")`), so `L(f)`
is seen as torch.load; a name bound two ways in one file is checked as each. What is there on
purpose is in ALLOWED, each with its reason; the list is closed both ways (a finding not in it
fails, and so does an entry that no longer matches anything)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = [ROOT / "src" / "prefalign", ROOT / "scripts", ROOT / "benchmarks"]
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
READS_PICKLE = {"load", "loads", "Unpickler", "_load", "_loads", "open"}  # open: shelve's (a pickle per key)
SAFE_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
STAR_WATCHED = PICKLERS | {"torch", "numpy", "yaml", "os", "subprocess", "builtins", "importlib", "runpy", "pandas"}
CONVENTIONS = {"np": "numpy", "pd": "pandas"}  # read as these when the file does not bind them otherwise

# (file, rule) -> why it is there.
ALLOWED = {
    ("src/prefalign/tasks/stages.py", "pickle.dumps"):
        "pickle.dumps of the caller's own log callable, in memory, only to ask whether multiprocessing "
        "(which pickles whatever it sends a child) can send it; nothing is ever read from a file",
    ("src/prefalign/judges/__init__.py", "dynamic import"):
        "the reward/judge MODULE:FUNCTION or FILE.py:FUNCTION: the user's own code, by design, named only "
        "in the config or on the command line (tests/faults/test_injection.py checks a data file cannot)",
    ("src/prefalign/train/trackers.py", "dynamic import"):
        "a tracker's package, from the fixed table PACKAGES (the config names a tracker, not a module)",
}
# the one entry that may match nothing: the ckpt branch removes torch.save; the lead deletes it at merge
MAY_GO_STALE: set[tuple[str, str]] = set()


def _aliases(tree: ast.AST) -> dict[str, set[str]]:
    """Local name -> the full dotted names it is bound to by imports and `x = a.b` assignments."""
    out: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                top = a.name.split(".")[0]
                out.setdefault(a.asname or top, set()).add(a.name if a.asname else top)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                if a.name != "*":
                    out.setdefault(a.asname or a.name, set()).add(f"{node.module}.{a.name}")
    for _ in range(2):  # assignments may chain (`T = torch`, `L = T.load`)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                names = _names(node.value, out)
                if names:
                    out.setdefault(node.targets[0].id, set()).update(names)
    return out


def _names(node: ast.AST, aliases: dict[str, set[str]]) -> set[str]:
    """Full dotted names a Name/Attribute chain (or getattr(x, "const")) can stand for; empty for others.
    `builtins.eval` reads as `eval`."""
    if isinstance(node, ast.Name):
        bound = aliases.get(node.id) or {CONVENTIONS.get(node.id, node.id)}
        return {n.removeprefix("builtins.") for n in bound}
    if isinstance(node, ast.Attribute):
        return {f"{base}.{node.attr}".removeprefix("builtins.") for base in _names(node.value, aliases)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
        return {f"{base}.{node.args[1].value}".removeprefix("builtins.") for base in _names(node.args[0], aliases)}
    return set()


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _arg(call: ast.Call, name: str, position: int):
    """The argument `name`, given by keyword or as the `position`th positional one (None if not given)."""
    kw = _kw(call, name)
    return kw if kw is not None else (call.args[position] if len(call.args) > position else None)


def _call_rules(call: ast.Call, name: str, aliases: dict[str, set[str]]) -> list[str]:
    """The rules one call breaks, `name` being one full dotted name its callee can stand for."""
    last = name.rsplit(".", 1)[-1]
    found = []
    if name in ("torch.load", "torch.serialization.load") and not _is(_kw(call, "weights_only"), True):
        found.append("torch.load without weights_only=True")
    if name in ("torch.save", "torch.serialization.save"):
        found.append("torch.save")
    if name.startswith("torch.hub."):
        found.append("torch.hub")  # downloads and imports a repo's hubconf.py, or torch.loads a URL
    if name == "torch.jit.load" or last in ("read_pickle", "to_pickle"):
        found.append(f"{name}: a pickle")
    allow = _arg(call, "allow_pickle", 2)  # numpy.load(file, mmap_mode, allow_pickle, ...)
    if name == "numpy.load" and allow is not None and not _is(allow, False):
        found.append("numpy.load with allow_pickle")
    if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
        found.append(name)
    if name in ("yaml.load", "yaml.load_all"):
        loader = _arg(call, "Loader", 1)
        loaders = _names(loader, aliases) if loader is not None else set()
        if not loaders or not all(n.rsplit(".", 1)[-1] in SAFE_LOADERS for n in loaders):
            found.append(f"{name} without a safe Loader")
    return found + _runs_code(call, name, last)


def _runs_code(call: ast.Call, name: str, last: str) -> list[str]:
    """The rules for what runs a string, a program or a module named at run time."""
    found = []
    if name in ("eval", "exec", "compile", "__import__", "importlib.__import__"):
        found.append(f"{last}()")
    if name.startswith("runpy."):
        found.append("runpy")
    if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput") \
            or ("shell" in [k.arg for k in call.keywords] and not _is(_kw(call, "shell"), False)):
        found.append("a shell command")
    if name.startswith(("os.exec", "os.spawn", "os.posix_spawn")):
        found.append("os.exec*/os.spawn*")
    if _is(_kw(call, "trust_remote_code"), True):
        found.append("trust_remote_code=True")
    if last == "from_pretrained" and _kw(call, "use_safetensors") is not None \
            and not _is(_kw(call, "use_safetensors"), True):
        found.append("from_pretrained without use_safetensors=True")  # False (or unknown): a .bin is unpickled
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


def _pickler_use(name: str) -> str | None:
    """The rule a use of `name` breaks if it is something of pickle's kin: reading one is a rule of its own."""
    parts = name.split(".")
    if parts[0] not in PICKLERS:
        return None
    if len(parts) == 1:
        return f"{name} (the module itself)"
    if parts[-1].endswith(("Error", "Exception")):
        return None  # catching pickle.PicklingError reads nothing
    return f"{name}: reads a pickle" if parts[-1] in READS_PICKLE else name


def findings(source: str) -> list[tuple[int, str]]:
    """(line, rule) for each thing in `source` that could run code read from a file."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # not the top of a chain
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and any(a.name == "*" for a in node.names) \
                and node.module.split(".")[0] in STAR_WATCHED:
            out.append((node.lineno, f"from {node.module} import *"))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            module = (node.module or "") if isinstance(node, ast.ImportFrom) else ""
            for a in node.names:  # importing pickle is no finding; using what was imported is
                full = f"{module}.{a.name}" if module else a.name
                if module.split(".")[0] in PICKLERS and (rule := _pickler_use(full)):
                    out.append((node.lineno, rule))
        elif isinstance(node, ast.Call):
            rules = {r for name in _names(node.func, aliases) for r in _call_rules(node, name, aliases)}
            out += [(node.lineno, rule) for rule in sorted(rules)]
        elif isinstance(node, ast.Dict):  # {"trust_remote_code": True, ...} handed to from_pretrained
            for k, v in zip(node.keys, node.values, strict=True):
                if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and _is(v, True):
                    out.append((node.lineno, "trust_remote_code=True"))
                if isinstance(k, ast.Constant) and k.value == "use_safetensors" and not _is(v, True):
                    out.append((node.lineno, "from_pretrained without use_safetensors=True"))
        if isinstance(node, (ast.Name, ast.Attribute)) and id(node) not in inner \
                and not isinstance(node.ctx, ast.Store):
            names = _names(node, aliases)
            out += [(node.lineno, rule) for rule in sorted({_pickler_use(n) for n in names} - {None})]
            out += [(node.lineno, n) for n in sorted(names)
                    if n.startswith("yaml.") and n.rsplit(".", 1)[-1] in ("Loader", "UnsafeLoader", "FullLoader")]
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
    stale = [key for key in ALLOWED if key not in found and key not in MAY_GO_STALE]
    assert not stale, f"ALLOWED entries that match nothing any more (take them out): {stale}"


# each rule seen to fire on the smallest source that breaks it (and not on its safe twin), written out
# and through each way a name can be bound to it
CASES = [
    ("import pickle\npickle.loads(b)\n", "pickle.loads: reads a pickle"),
    ("import pickle as p\np.load(f)\n", "pickle.load: reads a pickle"),
    ("from pickle import Unpickler\n", "pickle.Unpickler: reads a pickle"),
    ("from dill import loads\n", "dill.loads: reads a pickle"),
    ("import shelve\nshelve.open(p)\n", "shelve.open: reads a pickle"),
    ("import pickle\npickle.dumps(x)\n", "pickle.dumps"), ("import pickle\nf(pickle)\n", "pickle (the module itself)"),
    ("import joblib.numpy_pickle\njoblib.numpy_pickle.load(f)\n", "joblib.numpy_pickle.load: reads a pickle"),
    ("from pickle import *\n", "from pickle import *"),
    ("torch.load(f)\n", "torch.load without weights_only=True"),
    ("torch.load(f, weights_only=False)\n", "torch.load without weights_only=True"),
    ("import torch as T\nT.load(f)\n", "torch.load without weights_only=True"),
    ("from torch import load\nload(f)\n", "torch.load without weights_only=True"),
    ("from torch.serialization import load as L\nL(f)\n", "torch.load without weights_only=True"),
    ("import torch\nL = torch.load\nL(f)\n", "torch.load without weights_only=True"),
    ("getattr(torch, 'load')(f)\n", "torch.load without weights_only=True"),
    ("torch.save(x, f)\n", "torch.save"), ("torch.hub.load(repo, m)\n", "torch.hub"),
    ("from torch import hub\nhub.load_state_dict_from_url(u)\n", "torch.hub"),
    ("np.load(f, allow_pickle=True)\n", "numpy.load with allow_pickle"),
    ("np.load(f, None, True)\n", "numpy.load with allow_pickle"),
    ("np.load(f, allow_pickle=cfg.pickle)\n", "numpy.load with allow_pickle"),
    ("from numpy import load\nload(f, allow_pickle=True)\n", "numpy.load with allow_pickle"),
    ("yaml.load(s)\n", "yaml.load without a safe Loader"),
    ("yaml.load(s, Loader=yaml.FullLoader)\n", "yaml.load without a safe Loader"),
    ("from yaml import load\nload(s)\n", "yaml.load without a safe Loader"),
    ("from yaml import load, FullLoader as SafeLoader\nload(s, SafeLoader)\n", "yaml.load without a safe Loader"),
    ("from yaml import unsafe_load\nunsafe_load(s)\n", "yaml.unsafe_load"),
    ("yaml.unsafe_load(s)\n", "yaml.unsafe_load"), ("eval(row['expr'])\n", "eval()"), ("exec(code)\n", "exec()"),
    ("import builtins\nbuiltins.eval(s)\n", "eval()"), ("getattr(builtins, 'exec')(s)\n", "exec()"),
    ("importlib.__import__(name)\n", "__import__()"), ("import runpy\nrunpy.run_path(p)\n", "runpy"),
    ("subprocess.run(cmd, shell=True)\n", "a shell command"), ("os.system(cmd)\n", "a shell command"),
    ("subprocess.run(cmd, shell=cfg.shell)\n", "a shell command"),
    ("subprocess.getoutput(cmd)\n", "a shell command"), ("subprocess.getstatusoutput(cmd)\n", "a shell command"),
    ("os.execvp(p, args)\n", "os.exec*/os.spawn*"), ("from os import spawnl\nspawnl(m, p)\n", "os.exec*/os.spawn*"),
    ("load(p, trust_remote_code=True)\n", "trust_remote_code=True"),
    ("kw = {'trust_remote_code': True}\n", "trust_remote_code=True"),
    ("M.from_pretrained(p, use_safetensors=False)\n", "from_pretrained without use_safetensors=True"),
    ("kw = {'use_safetensors': False}\n", "from_pretrained without use_safetensors=True"),
    ("importlib.import_module(row['reward'])\n", "dynamic import"),
    ("from importlib import import_module as im\nim(row['reward'])\n", "dynamic import"),
    ("importlib.import_module('pickle')\n", "import pickle"), ("pd.read_pickle(f)\n", "pandas.read_pickle: a pickle"),
]
SAFE = ["torch.load(f, weights_only=True)\n", "from torch import load as L\nL(f, weights_only=True)\n",
        "np.load(f)\n", "np.load(f, None, False)\n", "np.load(f, allow_pickle=False)\n",
        "yaml.load(s, Loader=yaml.SafeLoader)\n", "from yaml import load, SafeLoader\nload(s, SafeLoader)\n",
        "yaml.safe_load(s)\n", "model.eval()\n", "re.compile(p)\n", "load(p, trust_remote_code=cfg.trust)\n",
        "importlib.import_module('prefalign.api')\n", "subprocess.run([sys.executable, '-c', code])\n",
        "subprocess.run(cmd, shell=False)\n", "M.from_pretrained(p, use_safetensors=True)\n",
        "import pickle\n", "import pickle\ntry:\n    f()\nexcept pickle.PicklingError:\n    pass\n",
        "torch.save_pretrained(p)\n", "os.path.exists(p)\n", "hub.load(p)\n", "T = 3\nT.load(f)\n"]


def test_each_rule_fires_and_safe_code_passes():
    for source, rule in CASES:
        assert rule in [r for _, r in findings(source)], source
    for source in SAFE:
        assert findings(source) == [], source
