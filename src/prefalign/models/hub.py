"""Models from the Hugging Face Hub, and a run's final/ pushed to it.

`resolve_model` (defined in data/hub.py, the lowest layer, so that data's optional tokenizer uses it too;
imported from here by everything else) is the one door every model and tokenizer load goes through
(models/load.py, scalar.py, export.py, merge.py, judges, eval, serve, plan): a local folder or file as it
is, or a Hub id `org/name[@revision][/path inside]` as its snapshot folder in the user's cache. Here: the
adapter's record of a Hub base, and the push.

`push_final` uploads a run's final/ (a LoRA adapter or a whole model, with its card) with huggingface_hub's
create_repo + upload_folder; `plan_push` is everything before the upload: which files, to which repo.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from huggingface_hub import create_repo, get_token, upload_folder

from ..data.hub import MODEL_FILES, HubRef, offline, parse_hub_id, pinned, resolve_model
from ..errors import ConfigError, ModelError, TrainingError

__all__ = ["adapter_base", "base_reference", "check_push", "check_repo_id", "default_repo_id", "plan_push",
           "push_final", "resolve_model"]


def base_reference(base: str | Path) -> tuple[str, str | None]:
    """(base_model_name_or_path, revision) for an adapter's config: a Hub base as its id and the commit
    it was loaded at (so the adapter, pushed or copied, loads on the very weights it was trained on),
    a local base as its path."""
    ref = None if Path(base).exists() else parse_hub_id(base)
    if ref is None:
        return str(base), None
    ref = pinned(ref, "model")
    return str(HubRef(ref.repo_id, None, ref.inside)), ref.revision


def adapter_base(folder: str | Path) -> str | None:
    """The base an adapter folder was trained on, as a spec `resolve_model` takes (its recorded
    revision included); None when FOLDER is not an adapter."""
    config = Path(folder) / "adapter_config.json"
    if not config.exists():
        return None
    data = json.loads(config.read_text())
    base, revision = data.get("base_model_name_or_path"), data.get("revision")
    if not base:
        raise ModelError(f"{folder}: adapter_config.json names no base model (base_model_name_or_path)")
    ref = None if Path(base).exists() else parse_hub_id(base)
    if ref is not None and revision and ref.revision is None:
        return str(HubRef(ref.repo_id, revision, ref.inside))
    return base


# ------------------------------------------------------------------ push


# what a final/ folder may publish: weights in safetensors, configs, tokenizer files and the card;
# anything else found there (a pickle, a stray log) is left out and named
PUSHED_FILES = [*MODEL_FILES, "README.md"]


@dataclass
class PushPlan:
    repo_id: str  # as given: org/name, or a bare name (the token owner's namespace)
    private: bool
    folder: Path
    files: list[str]  # relative to folder, exactly what upload_folder is given (allow_patterns)
    left_out: list[str]


def default_repo_id(output: str | Path) -> str:
    """hub_model_id when none is given: the run folder's name, in the namespace of the token's owner."""
    return Path(output).resolve().name


def check_repo_id(repo_id: str) -> str:
    """REPO_ID if it can name a model repo (org/name, or a name in the token owner's namespace)."""
    ref = parse_hub_id(repo_id if "/" in repo_id else f"user/{repo_id}")
    if ref is None or ref.revision or ref.inside:
        raise ConfigError(f"hub_model_id {repo_id!r}: not a Hub repo id (org/name or name: letters, digits, "
                          "'-', '_', '.', at most 96 characters; the default is the output folder's name)")
    return repo_id


def check_push(repo_id: str) -> None:
    """What a push needs, checked before training so that it fails now and not after the run: a valid
    repo id, not offline, a token. No network (whether the token may write there is the Hub's answer)."""
    check_repo_id(repo_id)
    if offline():
        raise ConfigError("push_to_hub: true, but HF_HUB_OFFLINE is set: the run could not upload final/ at its "
                          "end; unset HF_HUB_OFFLINE or set push_to_hub: false")
    if get_token() is None:
        raise ConfigError("push_to_hub: true needs a Hugging Face token with write access: hf auth login, or "
                          "HF_TOKEN")


def plan_push(final_dir: str | Path, repo_id: str, private: bool = False) -> PushPlan:
    """Which files of a run's final/ a push uploads, where to: safetensors weights, configs, tokenizer
    and card at its top level; never checkpoints, optimizer state or pickles (none are in final/, and the
    allow-list would leave them out if they were)."""
    folder = Path(final_dir)
    if not folder.is_dir():
        raise ModelError(f"{folder}: no final/ folder to push (the run did not finish?)")
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = [n for n in names if "/" not in n and any(fnmatch(n, p) for p in PUSHED_FILES)]
    if not any(n.endswith(".safetensors") for n in files):
        raise ModelError(f"{folder}: no *.safetensors weights to push")
    return PushPlan(repo_id, private, folder, files, [n for n in names if n not in files])


def push_final(final_dir: str | Path, repo_id: str, private: bool, log: Callable[[str], None] = print) -> str:
    """Upload a run's final/ to the Hub model repo REPO_ID (created if missing; an existing one gets a new
    commit). Returns the commit's URL. Needs the network and a token: not exercised by the tests."""
    plan = plan_push(final_dir, repo_id, private)
    if plan.left_out:
        log(f"push: leaving out {', '.join(plan.left_out)} (only safetensors, configs, tokenizer and card go)")
    try:
        repo = create_repo(plan.repo_id, private=plan.private, repo_type="model", exist_ok=True)
        commit = upload_folder(repo_id=repo.repo_id, folder_path=plan.folder, allow_patterns=plan.files,
                               repo_type="model", commit_message=f"prefalign: upload {plan.folder}")
    except Exception as e:  # whatever the Hub or the network said: the run itself is done and on disk
        raise TrainingError(f"{plan.folder} is saved, but pushing it to {plan.repo_id} failed ({type(e).__name__}: "
                            f"{e}); upload it later with: hf upload {plan.repo_id} {plan.folder}") from e
    log(f"pushed {len(plan.files)} files of {plan.folder} to {repo} ({commit.commit_url})")
    return commit.commit_url
