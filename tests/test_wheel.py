"""The built wheel, installed into a fresh environment and run from outside the repo: it holds every file the
package reads (the shipped model, the data, the review page, the eval suites), its `prefalign` command
works, and the code that runs is the installed copy. (The whole demo from the wheel is a benchmark:
benchmarks/wheel_demo.py.)"""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import prefalign

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from wheel_venv import build_wheel, clean_env, install  # noqa: E402

# run in the fresh environment, from a folder outside the repo: which prefalign, what ships with it, and two
# commands run in-process (each process start would import transformers again)
PROBE = """
import json, prefalign
from importlib import metadata, resources
from typer.testing import CliRunner
from prefalign import generate
from prefalign.cli import app
from prefalign.eval.suites import SHIPPED
from prefalign.review.server import STATIC
assets = resources.files("prefalign") / "assets"
said = generate(str(assets / "imdb-lm"), "This movie was", max_new_tokens=8, temperature=0)
check = CliRunner().invoke(app, ["data", "check", str(assets / "hh_rlhf_harmless_100.jsonl")])
demo = CliRunner().invoke(app, ["demo", "--help"])
print(json.dumps({"file": prefalign.__file__, "version": metadata.version("prefalign"), "said": said,
                  "static": sorted(p.name for p in STATIC.iterdir()), "suites": [p.name for p in SHIPPED.iterdir()],
                  "check": [check.exit_code, check.output], "demo": [demo.exit_code, demo.output]}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    built = build_wheel(root)
    outside = root / "elsewhere"
    outside.mkdir()
    return built, install(built, root / "venv"), outside


def _run(bin_dir: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True,
                          env={**clean_env(), **env}, timeout=120)


def test_the_wheel_holds_every_file_the_package_reads(wheel):
    built, _, _ = wheel
    names = set(zipfile.ZipFile(built).namelist())
    src = ROOT / "src"
    shipped = {p.relative_to(src).as_posix() for p in (src / "prefalign").rglob("*")  # editors' files aside
               if p.is_file() and p.suffix != ".pyc" and "__pycache__" not in p.parts and not p.name.startswith(".")
               and not p.name.endswith("~")}
    assert shipped and not shipped - names, sorted(shipped - names)
    for must in ("assets/imdb-lm/model.safetensors", "assets/imdb-lm/tokenizer.json", "assets/LICENSE.hh-rlhf",
                 "review/static/page.js", "eval/suites/safety.yaml"):
        assert f"prefalign/{must}" in names
    meta = zipfile.ZipFile(built).read(f"prefalign-{prefalign.__version__}.dist-info/METADATA").decode()
    assert f"\nVersion: {prefalign.__version__}\n" in meta
    assert built.name == f"prefalign-{prefalign.__version__}-py3-none-any.whl"


def test_the_installed_copy_runs_outside_the_repo(wheel):
    _, bin_dir, outside = wheel
    probe = _run(bin_dir, outside, "python", "-c", PROBE)
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout.splitlines()[-1])
    assert Path(seen["file"]).is_relative_to(bin_dir.parent) and seen["version"] == prefalign.__version__
    assert seen["static"] == ["page.css", "page.html", "page.js"] and "arithmetic.yaml" in seen["suites"]
    assert len(seen["said"]) == 1 and len(seen["said"][0].split()) >= 3  # the shipped model writes words
    # the shipped HH sample has one bad record (line 87, an empty chosen answer): the data layer finds it
    code, printed = seen["check"]
    assert code == 1 and "hh_rlhf_harmless_100.jsonl:87: chosen" in printed, printed
    assert "100 records, 99 valid, 1 invalid" in printed
    assert seen["demo"][0] == 0 and "--quick" in seen["demo"][1]
    # the installed command itself (its entry point)
    version = _run(bin_dir, outside, "prefalign", "--version")
    assert version.returncode == 0 and version.stdout.startswith(f"prefalign {prefalign.__version__} (torch ")
    # shell completion through the installed command, as the shell calls it on TAB
    tab = _run(bin_dir, outside, "prefalign", _PREFALIGN_COMPLETE="complete_bash", COMP_WORDS="prefalign de",
               COMP_CWORD="1")
    assert tab.returncode == 0 and tab.stdout.split() == ["demo"]
