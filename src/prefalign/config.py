"""Typed configuration: one pydantic model per command, loaded from YAML plus `key=value` overrides.

Unknown keys are errors that name the key and the closest valid one: a typo in a recipe must never
be silently ignored.
"""

from __future__ import annotations

import difflib
import math
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

C = TypeVar("C", bound="StrictModel")


class _Checked(type(BaseModel)):  # pydantic's metaclass
    if not TYPE_CHECKING:  # type checkers keep pydantic's typed constructor (one keyword per field)
        def __call__(cls, *args: Any, **data: Any) -> Any:
            # a config built in Python (the API, a notebook) fails as one from YAML does: a ConfigError naming
            # the key. Only a call goes through here; validating a mapping or a nested model does not.
            try:
                return super().__call__(*args, **data)
            except ValidationError as e:
                raise ConfigError(explain(e, cls, cls.__name__)) from None


class StrictModel(BaseModel, metaclass=_Checked):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="after")
    @classmethod
    def _not_nan(cls, value: Any) -> Any:
        # YAML's .nan passes every bound (NaN compares false) and would train silently on NaN; no setting means it
        if isinstance(value, float) and math.isnan(value):
            raise ValueError("NaN is no value for a setting")
        return value


_SHOWN = reprlib.Repr()  # keyword settings only from Python 3.12
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlist, _SHOWN.maxdict = 2, 60, 60, 4, 4


def shown(value: Any) -> str:
    """A value as an error message quotes it: cut short however large, deep or aliased (a YAML 'billion
    laughs' of anchors is small to load and astronomically long to print in full)."""
    return _SHOWN.repr(value)


class Runtime(StrictModel):
    """Where and how a command computes: declared once, shared by train, eval and sample configs."""

    device: str = Field("auto", description="auto (CUDA/ROCm, XPU, MPS, else CPU) or a torch device name")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast or fp32; auto: bf16 on a CUDA GPU that supports it")
    seed: int = Field(0, description="seed of every random draw (data order, sampling, init)")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; unset: torch's default")
    chat_template: str | None = Field(
        None, description="replaces the tokenizer's chat template: NAME (shipped: chatml, zephyr, llama3) or FILE (a "
                          "Jinja file); conversations need one (docs/conversations.md)")


class Remote(StrictModel):
    """Where an OpenAI-compatible server is (generation_backend: openai): sample, label and eval."""

    base_url: str | None = Field(None, description="openai: the server's API root, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: the environment variable that holds the API key "
                                                           "(unset: no key is sent)")

    @model_validator(mode="after")
    def _remote(self):
        remote = getattr(self, "generation_backend", "hf") == "openai"
        if remote and not self.base_url:
            raise ValueError("generation_backend: openai needs base_url (the server's API root, .../v1)")
        if not remote and self.base_url:
            raise ValueError("base_url is for generation_backend: openai")
        return self


class Sampling(Remote):
    """How completions are sampled: declared once, shared by RL, eval, sample and the KL monitor."""

    max_new_tokens: int = Field(32, ge=0, description="tokens sampled per completion at most")
    temperature: float = Field(1.0, ge=0, description="softmax temperature; 0: greedy")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0: off")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass; 1: off")
    generation_backend: Literal["hf", "vllm", "openai"] = Field(
        "hf", description="hf: transformers' generate; vllm: a colocated vLLM engine (optional extra, GPU; "
                          "not yet run); openai: an OpenAI-compatible server at base_url (prefalign serve, vLLM, "
                          "...; sample and eval; RL cannot); the KL monitor always samples with hf")
    vllm_memory_fraction: float = Field(0.3, gt=0, lt=1, description="vllm: share of the GPU's memory the engine takes")
    served_model: str | None = Field(None, description="openai: the name the server knows `model` by; default: "
                                                       "`model` as written (prefalign serve names a model by its path)")

    @model_validator(mode="after")
    def _served_model(self):
        if self.served_model and self.generation_backend != "openai":
            raise ValueError("served_model is for generation_backend: openai")
        return self

    @classmethod
    def of(cls, cfg: Any) -> Sampling:
        """The sampling settings of a config that declares them (it derives from Sampling)."""
        return cls(**{k: getattr(cfg, k) for k in cls.model_fields})


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (["a", "b"], 3). The value is read as YAML so numbers, bools and lists work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):  # not YAML (or too deep to be): the text as written
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
            node[part] = child = dict(child)
            node = child
        node[path[-1]] = value
    return data


def _members(annotation: Any) -> list[Any] | None:
    """The members of a union pydantic tags its errors with (`bool | Lora`, `str | list[...]`); None for
    anything else, `X | None` included (pydantic does not tag a nullable type)."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    return members if len(members) > 1 else None


def _member(members: list[Any], tag: str) -> Any:
    """The member a pydantic tag ('LoraSettings', 'list[function-after[..., DataSource]]', 'str') names."""
    for m in members:
        origin = typing.get_origin(m)
        name = getattr(origin or m, "__name__", str(m))
        if tag == name or tag.startswith(name + "["):
            return m
        if isinstance(m, type) and issubclass(m, BaseModel) and re.search(rf"\b{m.__name__}\b", tag):
            return m
    return None


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None, bool]:
    """Follow an error location through nested models, lists and mappings, dropping pydantic's union-member
    tags: (the key path a user wrote, list indices as `[i]`; the model that owns its last key; whether the
    location ends at a union member: an error about the value's type as a whole)."""
    path: list[str] = []
    owner, annotation, at_tag = None, model, False
    for part in loc:
        if (members := _members(annotation)) is not None:
            annotation, at_tag = _member(members, str(part)), True
            continue
        at_tag = False
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(inner) == 1:
            annotation = inner[0]  # X | None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            owner = annotation
            field = annotation.model_fields.get(str(part))
            annotation = field.annotation if field is not None else None
        elif typing.get_origin(annotation) is list and isinstance(part, int):
            owner, annotation = None, typing.get_args(annotation)[0]
            path.append(f"[{part}]")
            continue
        else:
            owner = None
            annotation = typing.get_args(annotation)[1] if typing.get_origin(annotation) is dict else None
        path.append(str(part))
    return path, owner, at_tag


def explain(error: ValidationError, model: type[BaseModel], source: str) -> str:
    items = error.errors()
    # With a union (`lora: Lora | bool`) pydantic reports every branch; a typo is the useful one.
    if any(i["type"] == "extra_forbidden" for i in items):
        items = [i for i in items if i["type"] == "extra_forbidden"]
    walked = [(i, *_walk(model, tuple(i["loc"]))) for i in items]
    # ...and a value of one branch's type (a list of sources) fails the others' ("not a string") too
    deeper = {i["loc"][0] for i, _, _, at_tag in walked if i["loc"] and not at_tag}
    lines = []
    for item, path, owner, at_tag in walked:
        if not item["loc"]:  # a check across fields (a model validator)
            lines.append(f"{source}: {item['msg'].removeprefix('Value error, ')}")
            continue
        if at_tag and item["loc"][0] in deeper:
            continue
        key = "".join(p if p.startswith("[") or not i else "." + p for i, p in enumerate(path))
        if item["type"] == "extra_forbidden":
            valid = sorted(owner.model_fields) if owner else []
            close = difflib.get_close_matches(path[-1], valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            lines.append(f"{source}: unknown key '{key}'{hint}")
        elif item["type"] == "missing":  # its input is the whole mapping, which says nothing
            lines.append(f"{source}: {key}: Field required")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {key}: {message} (got {shown(item.get('input'))})")
    return "\n".join(dict.fromkeys(lines))


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """What a YAML file holds; every way it cannot be read is a ConfigError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): save the "
                          f"{what} as UTF-8") from None
    try:  # a UTF-8 BOM (Notepad's) would show in the text an error quotes, and shift its columns
        return yaml.safe_load(text.removeprefix("\ufeff"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{path}: not readable YAML: nested too deeply") from None


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping of keys to values."""
    loaded = read_yaml(path) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values, not {type(loaded).__name__}")
    return loaded


def load_config(model: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None, source: str | None = None) -> C:
    """Validate `base` <- YAML file <- overrides (later wins) into `model`."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data.update(read_mapping(path))
    data = apply_overrides(data, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(explain(e, model, source or (str(path) if path is not None else "command line"))) from None


def dump_config(config: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
