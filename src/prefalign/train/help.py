"""Help from the types: a method's keys (type, default, description) read from its config class, for
`prefalign config show NAME`, `prefalign train --method NAME --help` and docs/methods.md's key table."""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .methods import METHODS, get_method, own_keys


def _type(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # a constrained type: its base (the constraints are in the description)
        return _type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType) and any(typing.get_origin(a) for a in typing.get_args(annotation)):
        return " | ".join(_type(a) for a in typing.get_args(annotation))
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    for noise in ("typing.", "prefalign.train.config.", "prefalign.data.mixture.", "<class '", "'>"):
        text = text.replace(noise, "")
    if typing.get_origin(annotation) is typing.Literal:
        text = " | ".join(str(a) for a in typing.get_args(annotation))
    return text


def key_rows(cls: type[BaseModel], keys: list[str], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for each key of `cls`; a key that is a settings block of its own
    (guards) is followed by its keys, `guards.kl_max`, ..."""
    rows = []
    for key in keys:
        field = cls.model_fields[key]
        block = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) \
            else None
        if field.default is PydanticUndefined and field.default_factory is None:
            default = "(required)"
        else:
            default = "{}" if block else repr(field.get_default(call_default_factory=True))
        rows.append((prefix + key, _type(field.annotation), default, field.description or ""))
        if block is not None:
            rows += key_rows(block, list(block.model_fields), f"{prefix}{key}.")
    return rows


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return [f"  {k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {text}" for k, t, d, text in rows]


def config_help(name: str) -> str:
    spec = get_method(name)
    cls = spec.config
    own = own_keys(cls)
    shared = [k for k in cls.model_fields if k not in own and k != "method"]
    lines = [f"{name}: {(cls.__doc__ or '').strip()}",
             f"trainer {spec.trainer}; data {spec.unit}; reference {'yes' if spec.reference else 'no'}; "
             f"KL: {spec.kl}", ""]
    if own:
        lines += [f"{name}'s own keys:", *_table(key_rows(cls, own)), ""]
    lines += ["keys every run of this kind has:", *_table(key_rows(cls, shared))]
    return "\n".join(lines)


def methods_table() -> str:
    rows = [(name, spec.trainer, spec.unit, "yes" if spec.reference else "no", spec.paper or "-")
            for name, spec in METHODS.items()]
    head = ("method", "trainer", "data", "reference", "paper")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    return "\n".join("  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True)) for r in [head, *rows])
