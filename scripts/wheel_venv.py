"""Build prefalign's wheel from a clean copy of this tree and install it into a fresh virtual environment,
offline: the check that what ships (code, the shipped model and data, the review page's files) is
enough on its own. tests/test_wheel.py and benchmarks/wheel_demo.py use it.

The new environment holds nothing of its own but the wheel (installed with --no-deps): one line in a
.pth file puts this interpreter's site-packages (torch, transformers, ...) after its own, so nothing is
downloaded and the installed prefalign is found first. An editable install of prefalign in those
site-packages is a .pth file of its own, which a path line does not run: the repo's src/ stays off
the path (the callers check prefalign.__file__).

    python scripts/wheel_venv.py OUT    # builds OUT/dist/prefalign-*.whl, installs OUT/venv/bin/prefalign
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build_wheel(out: Path) -> Path:
    """pip's wheel of a copy of pyproject.toml, README.md and src/ (no build/ or egg-info left in the
    repo), with this interpreter's setuptools: no build isolation, no index."""
    tree = out / "tree"
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
          str(out / "dist"), str(tree)])
    (wheel,) = (out / "dist").glob("prefalign-*.whl")
    return wheel


def install(wheel: Path, venv: Path) -> Path:
    """A fresh venv (no pip of its own: this interpreter's pip installs into it), the wheel without its
    dependencies, and this interpreter's site-packages after its own. Returns the venv's bin/."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)])
    own = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    shared = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(own) / "_shared_site_packages.pth").write_text("".join(f"{p}\n" for p in shared))
    return venv / "bin"


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env=clean_env())
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH (which would put a source tree first), offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "HF_HUB_OFFLINE": "1"}


if __name__ == "__main__":
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(install(build_wheel(out), out / "venv") / "prefalign")
