"""What a model card is made of (report/card.py), read from a run folder: config.yaml, run.json,
data_stats.json (measured here the first time), an evaluation's eval.json; and the Hub ids and licence
the header may name, read from the Hugging Face cache and the base model's own card."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import metadata_load, try_to_load_from_cache

from ..data import ReadOptions, load_prompts
from ..data.curate import compute_stats
from ..data.hub import hub_cache, parse_hub_id
from ..errors import ConfigError, PrefalignError
from ..train.methods import Method, get_method

CARD = "README.md"
STATS = "data_stats.json"
# a folder of the Hugging Face cache: .../models--ORG--NAME/snapshots/REVISION/...
_CACHED = re.compile(r"(models|datasets)--([^/]+?)--([^/]+)/snapshots/[^/]+")


@dataclass
class Sources:
    """Everything a card is made of, read from the run folder (and its evaluation's)."""

    run: Path
    config: dict[str, Any]  # config.yaml as the run resolved it
    summary: dict[str, Any]  # run.json
    stats: dict[str, Any]  # data_stats.json
    evaluation: dict[str, Any] | None = None  # eval.json
    eval_dir: Path | None = None
    eval_note: str = ""  # why an eval.json that was found is not on the card

    @property
    def final(self) -> Path:
        return self.run / "final"

    @property
    def spec(self) -> Method:
        return get_method(self.config.get("method", "dpo"))

    @property
    def adapter(self) -> dict[str, Any] | None:
        path = self.final / "adapter_config.json"
        return json.loads(path.read_text()) if path.exists() else None


def gather(run: Path, eval_dir: Path | None = None, fresh_stats: bool = False) -> Sources:
    for name in ("run.json", "config.yaml", "final"):
        if not (run / name).exists():
            raise ConfigError(f"{run}: no {name} (a model card is written for a finished `prefalign train` run "
                              "folder: config.yaml, run.json and final/)")
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    summary = json.loads((run / "run.json").read_text())
    src = Sources(run, config, summary, {})
    src.stats = data_stats(src, fresh_stats)
    src.eval_dir, src.evaluation, src.eval_note = find_evaluation(src, eval_dir)
    return src


# ---------------------------------------------------------------- the data


def data_files(config: dict[str, Any], summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, path) of every data file the run read: data, eval_data, prompts, and each source of a
    mixture (run.json's data_sources), each once."""
    files = [(role, config[role]) for role in ("data", "eval_data", "prompts") if isinstance(config.get(role), str)]
    files += [("source", s["path"]) for s in summary.get("data_sources") or [] if isinstance(s.get("path"), str)]
    seen: set[str] = set()
    return [(r, p) for r, p in files if not (p in seen or seen.add(p))]


def data_stats(src: Sources, fresh: bool = False) -> dict[str, Any]:
    """data_stats.json: `prefalign data stats` of each data file (prompt files: their prompt count),
    token lengths under final/'s tokenizer; a file that cannot be read is recorded with why."""
    path = src.run / STATS
    if path.exists() and not fresh:
        return json.loads(path.read_text())
    tokenizer = str(src.final) if (src.final / "tokenizer_config.json").exists() else None
    fmt = str(src.config.get("format", "auto"))
    own = {s["path"]: s for s in src.summary.get("data_sources") or [] if isinstance(s.get("path"), str)}
    files = []
    for role, file in data_files(src.config, src.summary):
        entry: dict[str, Any] = {"path": file, "role": role}
        source = own.get(file, {})  # a mixture's source is read as the run read it: its split and format
        opts = ReadOptions(format=source.get("format") or fmt, split=source.get("split"))
        if source.get("split"):
            entry["split"] = source["split"]
        try:
            if role == "prompts" and src.spec.trainer == "rl":
                prompts, problems = load_prompts(file, opts)
                entry["stats"] = {"prompts": len(prompts), "invalid": len(problems)}
            else:
                entry["stats"] = compute_stats(file, opts, tokenizer=tokenizer).to_json()
        except (PrefalignError, OSError) as e:  # moved or unreadable since: the card says so
            entry["error"] = str(e)
        files.append(entry)
    stats = {"tokenizer": tokenizer, "files": files}
    path.write_text(json.dumps(stats, indent=2))
    return stats


# ---------------------------------------------------------------- the evaluation


def find_evaluation(src: Sources, eval_dir: Path | None) -> tuple[Path | None, dict[str, Any] | None, str]:
    """(folder, eval.json, a note) of an evaluation of this run's final/: --eval DIR, else RUN/ or RUN/eval/.
    One of another model, or of an earlier model trained into this folder, is refused (--eval) or left
    out with a note saying why (found by itself): its numbers must not land on this model's card."""
    candidates = [eval_dir] if eval_dir is not None else [src.run, src.run / "eval"]
    found = next((d for d in candidates if (d / "eval.json").exists()), None)
    if found is None:
        if eval_dir is not None:
            raise ConfigError(f"{eval_dir}: no eval.json (`prefalign eval --model {src.final} ... -o {eval_dir}` "
                              "writes it)")
        return None, None, ""
    path = found / "eval.json"
    evaluation = json.loads(path.read_text())
    model = evaluation.get("model")
    problem = ""
    if model and not _same_model(model, src.final):
        problem = f"{path} is an evaluation of {model}, not of this run's {src.final}"
    elif path.stat().st_mtime < max((w.stat().st_mtime for w in src.final.glob("*.safetensors")), default=0.0):
        problem = f"{path} is older than {src.final}'s weights: an evaluation of an earlier model trained there"
    if problem and eval_dir is not None:
        raise ConfigError(problem)
    return (None, None, f"Not shown: {problem}.") if problem else (found, evaluation, "")


def _same_model(model: str, final: Path) -> bool:
    """Whether eval.json's `model` is this run's final/: the same folder when the path exists here; a
    path that does not (written relative to another folder) must end in this run's RUN/final; a Hub id
    or any other name is another model."""
    if Path(model).exists():
        return Path(model).resolve() == final.resolve()
    return Path(model).parts[-2:] == final.resolve().parts[-2:]


# ---------------------------------------------------------------- the header


def hub_id(name: str, kind: str = "models") -> str | None:
    """The Hub id a model (or dataset) was loaded by, or None for a local one: an id as the config wrote
    it (org/name, @revision, a file inside: data/hub.py's parser, the one the loaders use); a folder or
    file of the Hugging Face cache (the path as written, not its blob); an adapter folder: its base's id
    (the chain of adapters followed)."""
    seen: set[Path] = set()
    while name:
        path = Path(name)
        if not path.exists():
            ref = parse_hub_id(name)
            return ref.repo_id if ref is not None else None
        if m := _CACHED.search(path.absolute().as_posix()):
            return f"{m.group(2)}/{m.group(3)}" if m.group(1) == kind else None
        adapter = path / "adapter_config.json"
        if kind != "models" or not adapter.exists() or path.resolve() in seen:
            return None
        seen.add(path.resolve())
        name = str(json.loads(adapter.read_text()).get("base_model_name_or_path") or "")
    return None


def base_license(model: str) -> dict[str, str]:
    """license (and license_name/license_link) from the base model's own card, local or cached."""
    readme: Any = Path(model) / CARD
    if not readme.exists() and (repo := hub_id(model)) is not None:
        ref = parse_hub_id(model)
        readme = try_to_load_from_cache(repo, CARD, cache_dir=hub_cache(),
                                        revision=ref.revision if ref is not None and ref.repo_id == repo else None)
    if not isinstance(readme, (str, Path)) or not Path(readme).exists():
        return {}
    try:
        meta = metadata_load(readme) or {}
    except (ValueError, yaml.YAMLError):  # a card whose header does not parse states no licence we can read
        return {}
    return {k: str(meta[k]) for k in ("license", "license_name", "license_link") if meta.get(k)}
