"""Typed dataclass configs from YAML recipes, with dotted command-line overrides.

``load_config(Recipe, "recipes/x.yaml", ["train.lr=2e-4"])`` reads the YAML, applies the overrides (values parsed as
YAML, so ``2e-4``, ``true``, ``[64, 128]`` work) and builds the dataclass tree, checking every key and type. Unknown
keys and wrong types raise :class:`~fastdiff.errors.InputError` naming the dotted key, what was expected and what was
given. No strings are ever turned into classes here.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fastdiff.errors import InputError

__all__ = ["load_config", "from_dict", "apply_overrides", "to_dict", "recipe_objective"]

T = TypeVar("T")
_YAML12_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def load_config(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from the YAML file at ``path`` and ``key.sub=value`` overrides."""
    path = Path(path)
    return from_dict(cls, apply_overrides(_read_yaml(path), overrides), where=str(path))


def _read_yaml(path: Path) -> dict[str, Any]:
    """A recipe file's top-level mapping, or a clear error."""
    if not path.is_file():
        raise InputError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a mapping of keys at the top level; got {type(data).__name__}")
    return data


def recipe_objective(path: str | Path) -> str:
    """The ``objective`` a recipe file names (``denoising`` when absent), to pick its recipe class."""
    return str(_read_yaml(Path(path)).get("objective", "denoising"))


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``a.b.c=value`` set (the value parsed as YAML)."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"override {item!r} must look like key.sub=value")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursively, checking keys and types."""
    if not isinstance(data, Mapping):
        raise InputError(f"{where}: {prefix.rstrip('.') or 'the config'} must be a mapping; got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"{where}: unknown key {prefix + unknown[0]!r}; expected one of {', '.join(prefix + k for k in fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, where, prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a dataclass config (tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def _convert(tp: Any, value: Any, where: str, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where, key)
            except InputError:
                continue
        raise _type_error(where, key, tp, value)
    if origin is typing.Literal:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no / yes / off / on as a bool: take the word meant
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((a for a in args if isinstance(a, str) and a.lower() in words), value)
        if value not in args:
            raise InputError(f"{where}: key {key!r} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _type_error(where, key, tp, value)
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _type_error(where, key, tp, value)
        if len(args) == 2:  # e.g. trainer.phase_optim: {critic: {lr: ...}} -> OptimConfig values
            return {k: _convert(args[1], v, where, f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _YAML12_FLOAT.match(value):
        return float(value)  # PyYAML reads 2e-4 as a string (YAML 1.1); YAML 1.2 and people read a number
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise _type_error(where, key, tp, value)
    return value


def _describe(tp: Any) -> str:
    """``int``, ``'no', 'fp16' or 'bf16'``, ``str or null``, ... for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _type_error(where: str, key: str, tp: Any, value: Any) -> InputError:
    return InputError(f"{where}: key {key!r} expects {_describe(tp)}; got {type(value).__name__} {value!r}")


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _plain(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain(v) for v in data]
    return data
