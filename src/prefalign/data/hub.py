"""Hugging Face Hub repos as local folders in the user's cache: ids, revisions, offline mode.

Every model, tokenizer or dataset argument is a local path, or a Hub id: `org/name`, with an optional
revision (`org/name@v1.0`, `org/name@<commit sha>`; a `/` in a branch name is written `%2F`) and an
optional path inside the repo (`org/name@v1.0/data/train.jsonl`). A path that exists is always a local
path, whatever it looks like; only one that does not exist and reads as an id goes to the Hub.

An id is resolved with huggingface_hub's `snapshot_download` into the user's cache (HF_HUB_CACHE, else
HF_HOME/hub, else ~/.cache/huggingface/hub: the folder transformers and datasets use), and the rest of
prefalign reads the snapshot folder as it would any local one. With HF_HUB_OFFLINE=1 nothing is fetched:
a repo missing from the cache is an error naming the cache folder looked in. Both are read from the
environment at every call (huggingface_hub reads its own once, at import), so a test or a caller that
sets them late is obeyed.

This module is in the data layer because both the data readers and every model load need it (the
model loaders import `resolve_model` through models/hub.py, which adds the push); huggingface_hub is
imported in the functions, so `prefalign data ...` on local files never pays for it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

from ..errors import DataError, ModelError, PrefalignError

# org/name, then @revision (no "/"), then a path inside the repo; huggingface_hub's validate_repo_id
# decides the exact characters of the id. No ":" anywhere: `file.py:function` and `module:function` are
# reward callables, never ids
_HUB_ID = re.compile(r"(?P<repo>[^/@:\s]+/[^/@:\s]+)(?:@(?P<revision>[^/@:\s]+))?(?:/(?P<inside>[^@:\s]+))?")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's own reading of a boolean variable


@dataclass(frozen=True)
class HubRef:
    repo_id: str  # org/name
    revision: str | None = None  # branch, tag or commit; None: the repo's main branch
    inside: str = ""  # a file or folder inside the repo; "": its root

    def __str__(self) -> str:
        rev = "@" + self.revision.replace("/", "%2F") if self.revision else ""
        return self.repo_id + rev + (f"/{self.inside}" if self.inside else "")


def parse_hub_id(spec: str | Path) -> HubRef | None:
    """The Hub reference SPEC names, or None when it is not one (it is then a local path)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    match = _HUB_ID.fullmatch(str(spec))
    if match is None or Path(match["repo"].split("/")[0]).exists():
        return None  # runs/sft/final with runs/ here is a mistyped local path: it must not go to the Hub
    try:
        validate_repo_id(match["repo"])  # rules out ./x, ../x, a--b, x.git
    except HFValidationError:
        return None
    inside = match["inside"] or ""
    if inside and any(part in ("", ".", "..") for part in inside.split("/")):
        return None  # a path inside a repo never climbs out of it
    return HubRef(match["repo"], unquote(match["revision"]) if match["revision"] else None, inside)


def hub_cache() -> Path:
    """The cache huggingface_hub uses, from the environment as it is now (its own constant is read at import)."""
    def expand(value: str) -> str:
        return os.path.expandvars(os.path.expanduser(value))

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(expand(os.environ[name]))
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(expand(home)) / "hub"


def offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' older TRANSFORMERS_OFFLINE) as huggingface_hub reads it, read now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def repo_folder(ref: HubRef, repo_type: str) -> Path:
    """Where the cache keeps the repo (models--org--name, datasets--org--name)."""
    from huggingface_hub.file_download import repo_folder_name

    return hub_cache() / repo_folder_name(repo_id=ref.repo_id, repo_type=repo_type)


class _NeverRaised(Exception):
    """Stands in for an error class an older huggingface_hub does not have."""


def snapshot(ref: HubRef, repo_type: str, allow: list[str] | None, ignore: list[str] | None,
             error: type[PrefalignError]) -> Path:
    """The snapshot folder of REF's revision in the cache, after downloading the files that match
    ALLOW and not IGNORE (unless offline). Every way this fails is an ERROR naming the id and the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:  # huggingface_hub >= 1.0; the 0.x that transformers 4 needs raises LocalEntryNotFoundError instead
        from huggingface_hub.errors import IncompleteSnapshotError
    except ImportError:
        IncompleteSnapshotError = _NeverRaised  # noqa: N806

    cache, rev = hub_cache(), ref.revision or "main"
    what = f"{ref}: no such local path, and the Hub {repo_type} {ref.repo_id} (revision {rev})"
    try:
        folder = snapshot_download(ref.repo_id, repo_type=repo_type, revision=ref.revision, cache_dir=cache,
                                   local_files_only=offline(), allow_patterns=allow, ignore_patterns=ignore)
    except IncompleteSnapshotError as e:  # cached for a tokenizer alone, say, and now its weights are needed
        raise error(f"{what} is only partly in the cache (looked in {repo_folder(ref, repo_type)}): {e}") from None
    except LocalEntryNotFoundError as e:
        if offline():
            raise error(f"{what} is not in the cache (looked in {repo_folder(ref, repo_type)}); HF_HUB_OFFLINE is "
                        "set, so nothing is downloaded: fetch it once online, or point HF_HUB_CACHE at a cache "
                        "that holds it") from None
        raise error(f"{what} is not in the cache {cache} and the Hub could not be reached: {e}") from None
    except RevisionNotFoundError:
        raise error(f"{what}: the repo has no revision {rev!r}") from None
    except GatedRepoError:
        raise error(f"{what} is gated: accept its terms on the Hub and log in (hf auth login or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise error(f"{what} does not exist, or it is private and no token with access was given (hf auth login "
                    "or HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise error(f"{what}: the Hub answered {e}") from None
    target = Path(folder) / ref.inside
    if not target.exists():
        have = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
        raise error(f"{ref}: no {ref.inside!r} in the Hub {repo_type} {ref.repo_id} (revision {rev}); it has "
                    + (", ".join(have[:12]) + (" ..." if len(have) > 12 else "") if have else "no files"))
    return target


def pinned(ref: HubRef, repo_type: str) -> HubRef:
    """REF at the commit its revision points to in the cache (no network), for a record that must load
    the same files later; REF unchanged when the cache has no such ref (a commit already, or never resolved)."""
    refs = repo_folder(ref, repo_type) / "refs" / (ref.revision or "main")
    if refs.is_file():
        return HubRef(ref.repo_id, refs.read_text().strip(), ref.inside)
    return ref


# ------------------------------------------------------------------ models

# a model folder's files at the repo's top level (or the folder named inside it): weights, configs,
# tokenizers (tokenizer.json, vocab.json, merges.txt, tokenizer.model, chat_template.jinja, *.tiktoken)
TOKENIZER_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
# README.md: the repo's model card, whose header states the licence a model card of ours repeats
MODEL_FILES = ["*.safetensors", "README.md", *TOKENIZER_FILES]


def resolve_model(spec: str | Path, *, tokenizer_only: bool = False, code: bool = False) -> Path:
    """A local model folder or file as it is; a Hub id as its snapshot folder in the cache (downloaded
    first unless HF_HUB_OFFLINE). A path that exists always wins; anything that is neither comes back
    unchanged for the caller to report missing. tokenizer_only: fetch no weights; code: fetch *.py too
    (trust_remote_code)."""
    path = Path(spec)
    ref = None if path.exists() else parse_hub_id(spec)
    if ref is None:
        return path
    return snapshot(ref, "model", *model_patterns(ref, tokenizer_only, code), ModelError)


def model_patterns(ref: HubRef, tokenizer_only: bool = False, code: bool = False) -> tuple[list[str], list[str]]:
    """(allow, ignore): the files of a model repo snapshot_download fetches. Never pickled weights
    (.bin, .pt, .pth), never code unless asked; a .gguf only when named."""
    if ref.inside.endswith(".gguf"):
        return [ref.inside], []
    prefix = f"{ref.inside}/" if ref.inside else ""
    patterns = (TOKENIZER_FILES if tokenizer_only else MODEL_FILES) + (["*.py"] if code else [])
    # top level only: a repo's subfolders (onnx/, original/, other checkpoints) are other models
    return [prefix + p for p in patterns], [prefix + "*/*"]


# ------------------------------------------------------------------ datasets

# what the readers (data/readers.py) read; save_to_disk's own metadata files are not records
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".arrow")
_METADATA = {"state.json", "dataset_info.json", "dataset_dict.json", "dataset_infos.json"}


def _is_data_file(rel: PurePosixPath) -> bool:
    name = rel.name.lower().removesuffix(".gz")
    hidden = any(part.startswith(".") for part in rel.parts)
    return name.endswith(DATA_SUFFIXES) and rel.name not in _METADATA and not hidden


# datasets' sharded layout, data/{split}-00000-of-00002.parquet, names its splits exactly (train_prefs,
# train_sft, ...): where a repo uses it, a split is that name and nothing that merely starts with it
_SHARDED = re.compile(r"data/(?P<split>[^/]+?)-\d{5}-of-\d{5}[^/]*")


def _sharded_split(rel: PurePosixPath) -> str | None:
    match = _SHARDED.fullmatch(rel.as_posix())
    return match["split"] if match else None


def _in_split(rel: PurePosixPath, split: str) -> bool:
    """datasets' naming of split files otherwise: train.jsonl, train_a.jsonl, train/part.csv."""
    return any(part == split or part.startswith((f"{split}-", f"{split}_", f"{split}.")) for part in rel.parts)


def pick_data_files(root: Path, split: str | None, ref: HubRef) -> list[Path]:
    """The files of a dataset snapshot (or of a folder inside it) to read, in order: the folder itself
    when it is a datasets.save_to_disk folder; else the files of SPLIT (default: train, or the only file)."""
    if root.is_file() or (root / "state.json").exists() or (root / "dataset_dict.json").exists():
        return [root]
    files = sorted(PurePosixPath(p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file())
    files = [f for f in files if _is_data_file(f)]
    if not files:
        raise DataError(f"{ref}: no data files ({', '.join(s.lstrip('.') for s in DATA_SUFFIXES)}) in it")
    sharded = {f: _sharded_split(f) for f in files}
    if splits := sorted({v for v in sharded.values() if v}):
        chosen = [f for f in files if sharded[f] == (split or "train")]
        if not chosen:
            raise DataError(f"{ref}: no split {split or 'train'!r}; its splits are {', '.join(splits)}: name one "
                            f"(a data source's `split`, e.g. data: [{{path: {ref}, split: {splits[0]}}}])")
        return [root / f for f in chosen]
    chosen = [f for f in files if _in_split(f, split or "train")]
    if not chosen and split is None and len(files) == 1:
        chosen = files
    if not chosen:
        listed = ", ".join(map(str, files[:12])) + (" ..." if len(files) > 12 else "")
        asked = f"no files of split {split!r}" if split else "several data files and none of split 'train'"
        raise DataError(f"{ref}: {asked}; name one as {HubRef(ref.repo_id, ref.revision)}/FILE (it has {listed})")
    return [root / f for f in chosen]


def data_files(spec: str | Path, split: str | None = None) -> list[Path]:
    """What a data argument reads: [SPEC] for a local path (or anything that is not a Hub id: the
    reader reports it missing), else the files of the Hub dataset it names, from the user's cache."""
    path = Path(spec)
    ref = None if path.exists() else parse_hub_id(spec)
    if ref is None:
        return [path]
    # only the readable files (or the one asked for) are fetched: not a repo's scripts or images
    everything = [f"*{suffix}{gz}" for suffix in DATA_SUFFIXES for gz in ("", ".gz")]
    allow = [ref.inside, f"{ref.inside}/*"] if ref.inside else everything
    return pick_data_files(snapshot(ref, "dataset", allow, None, DataError), split, ref)
