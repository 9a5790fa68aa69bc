"""MkDocs hook: serve the repository files the docs link to, so those links are checked too.

A page links to a results file or an example the way GitHub reads it, relative to docs/
(`../benchmarks/results/demo-cpu-2core.md`, `../examples/dpo.yaml`). MkDocs only knows the files
under docs/, so under `--strict` such a link would fail the build even when the file exists. This
hook adds every such target that exists to the site (at its repository path, without the `../`),
which makes the link work on the site and on GitHub alike, and leaves a missing target to MkDocs'
own strict check: a link to a file that was moved or deleted still fails the build.
A linked Markdown file (a results file) is rendered as a page, and the links in it are followed too.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

# ](target) of a Markdown link or image; the target ends at whitespace, ')' or '#'
LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s#]+)")


def _outside_targets(page: Path, docs: Path, repo: Path) -> list[Path]:
    """Existing files outside docs/ that `page` links to (relative links only)."""
    found = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        path = (page.parent / target).resolve()
        if path.is_file() and repo in path.parents and docs not in path.parents:
            found.append(path)
    return found


def on_files(files: Files, config) -> Files:
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    queue = [docs / f.src_uri for f in files if f.src_uri.endswith(".md")]
    seen: set[Path] = set()
    while queue:
        for path in _outside_targets(queue.pop(), docs, repo):
            if path in seen:
                continue
            seen.add(path)
            rel = path.relative_to(repo).as_posix()
            # src_uri as a page links it ("../x"), so MkDocs' own link lookup finds it
            dest = rel[:-3] + "/index.html" if rel.endswith(".md") and config["use_directory_urls"] else rel
            if rel.endswith(".md") and not config["use_directory_urls"]:
                dest = rel[:-3] + ".html"
            # explicit inclusion: MkDocs' default would exclude a path starting with '.' ("../")
            inclusion = InclusionLevel.NOT_IN_NAV if rel.endswith(".md") else InclusionLevel.INCLUDED
            files.append(File("../" + rel, str(docs), config["site_dir"], config["use_directory_urls"],
                              dest_uri=dest, inclusion=inclusion))
            if rel.endswith(".md"):
                queue.append(path)
    return files
