"""The documentation cannot drift: the site builds with --strict, every snippet marked runnable runs,
and every relative link in the README and the docs points at a file that exists.

A runnable snippet is a ```bash fence right after a line `<!-- runnable -->` (docs/architecture.md,
"The documentation"). A file's runnable snippets run in order in one temporary folder that links the
repository's src/ and examples/, as from a clone's root, offline."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MARKER = "<!-- runnable -->"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _fences(text: str):
    """(line number, opening line, body, line before) of every fenced block, outermost only."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(`{3,}|~{3,})(.*)$", lines[i])
        if not m:
            i += 1
            continue
        fence, start = m.group(1), i
        i += 1
        while i < len(lines) and not lines[i].startswith(fence):
            i += 1
        yield start + 1, lines[start], "\n".join(lines[start + 1:i]), lines[start - 1] if start else ""
        i += 1


def runnable_snippets(text: str) -> list[tuple[int, str]]:
    """(line, code) of each ```bash block that the runnable marker precedes; blocks nested inside
    another fence (an example of the marker, say) are not snippets."""
    return [(line, body) for line, opening, body, before in _fences(text)
            if before.strip() == MARKER and opening.strip() == "```bash"]


def outside_fences(text: str) -> str:
    """The text with every fenced block blanked out (links in code are not links)."""
    for _, opening, body, _ in _fences(text):
        text = text.replace(opening + "\n" + body, "", 1)
    return text


def test_the_extractor_sees_markers_and_only_them():
    text = ("<!-- runnable -->\n```bash\necho one\n```\n\n```bash\necho unmarked\n```\n\n"
            "````markdown\n<!-- runnable -->\n```bash\necho an example of the marker\n```\n````\n")
    assert runnable_snippets(text) == [(2, "echo one")]


SNIPPET_FILES = [p for p in doc_files() if runnable_snippets(p.read_text(encoding="utf-8"))]


def test_readme_has_a_runnable_example_and_the_quick_start_shows_it_verbatim():
    [(_, readme)] = runnable_snippets((ROOT / "README.md").read_text(encoding="utf-8"))
    quickstart = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    assert f"```bash\n{readme}\n```" in quickstart, "docs/quickstart.md's copy of the README example drifted"


@pytest.mark.parametrize("path", SNIPPET_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_runnable_snippets_run(path: Path, tmp_path: Path):
    for name in ("src", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    # offline; one CPU thread: the snippets' tiny models gain nothing from more, and on a busy machine
    # OpenMP's spin-waits doubled their CPU time
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1", "OMP_NUM_THREADS": "1",
           # `prefalign` and `python` of the interpreter running the tests
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    for line, code in runnable_snippets(path.read_text(encoding="utf-8")):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env, text=True,
                              capture_output=True, timeout=300)
        assert done.returncode == 0, (f"{path.relative_to(ROOT)}:{line}: exit {done.returncode}\n{code}\n"
                                      f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path):
    """MkDocs checks the docs' links when it builds; this also covers the README, which it does not read."""
    broken = []
    for target in LINK.findall(outside_fences(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        if not (path.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files: {broken}"


def _nav_files(nav) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    items = nav.values() if isinstance(nav, dict) else nav
    return set().union(*(_nav_files(item) for item in items))


def test_every_page_is_in_the_nav():
    nav = _nav_files(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages - nav == set(), "pages missing from mkdocs.yml's nav"
    assert nav - pages == set(), "nav entries without a page"


def test_site_builds_strictly(tmp_path: Path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module)
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], cwd=ROOT, text=True, capture_output=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    # the API reference was generated from the docstrings, the equations went to MathJax, and the
    # results files a page links to were copied into the site
    assert 'id="prefalign.losses.preference.dpo"' in (site / "api" / "index.html").read_text()
    assert 'class="arithmatex"' in (site / "methods" / "index.html").read_text()
    assert (site / "benchmarks" / "results" / "study-sentiment-frontier.png").is_file()
    shutil.rmtree(site)
