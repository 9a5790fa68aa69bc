"""The package's import graph: every module imports, the layer stack holds (import-linter's layers
contract in pyproject.toml), and imports sit at module top except the few optional or slow ones."""

import ast
import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import prefalign

SRC = Path(prefalign.__file__).parent
# function-level imports allowed, each for a reason written next to it: optional extras, a backend
# that must be chosen before import, and the CLI, whose commands load their layer only when run
# (pyarrow: only Parquet/Arrow input needs it; transformers: only data's optional tokenizer, so that
# `prefalign data ...` starts in a fraction of a second; vllm, openai: the optional generation backends; fastapi,
# uvicorn, starlette: the serve extra (runtime/http.py's guard imports starlette when it runs, so its
# is_loopback refuses an address with or without the extra); eval.metrics: torch (its bootstrap), which the
# review server needs only for an arena's win-rate and would otherwise pay a second of start-up for; gguf: the
# extra `export --format gguf` writes with; deepspeed: the optional ZeRO engine, absent from most
# installs and slow to import; torch.distributed.checkpoint: its HuggingFaceStorageWriter/Reader, which only a
# torch >= 2.9 has and only sharded checkpoints use, so that whole checkpoints run on the older torch allowed;
# wandb, mlflow, trackio, torch.utils.tensorboard: the experiment trackers (train/trackers.py), optional extras
# but TensorBoard, each imported only by a run that logs to it: mlflow alone costs 2 s, tensorboard 1.8 s;
# huggingface_hub: data/hub.py's Hub ids, which `prefalign data ...` on local files should not pay half a second for)
LAZY = ("vaderSentiment", "bitsandbytes", "matplotlib", "pyarrow", "transformers", "vllm", "openai", "fastapi",
        "uvicorn", "starlette", "eval.metrics", "gguf", "deepspeed", "torch.distributed.checkpoint", "wandb", "mlflow",
        "trackio", "torch.utils.tensorboard", "huggingface_hub", "methods")
LAZY += ("lm_eval",)  # the optional lm-evaluation-harness (extra lmeval): only `eval --lm-eval` pays its import
LAZY += ("pynvml", "amdsmi")  # the GPU vendors' energy counters (runtime/energy.py): optional, tried when read


def test_import_every_module():
    names = [m.name for m in pkgutil.walk_packages(prefalign.__path__, "prefalign.")]
    assert len(names) > 40
    for name in names:
        if name == "prefalign.__main__":
            continue
        importlib.import_module(name)


def test_layer_contract_holds():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a dev dependency"
    root = SRC.parent.parent
    proc = subprocess.run([exe, "--config", str(root / "pyproject.toml"), "--no-cache"], capture_output=True,
                          text=True, cwd=root, env={"PYTHONPATH": str(SRC.parent), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout + proc.stderr


def test_imports_at_module_top():
    late = []
    for path in SRC.rglob("*.py"):
        if path.parent.name == "cli":
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if not (mod or "").startswith(LAZY):
                        late.append(f"{path.relative_to(SRC)}:{node.lineno} {mod}")
    assert not late, late
