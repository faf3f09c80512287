"""Reading a saved model shape (`TeacherSpec`, `StudentSpec`, `SeqSpec`) back, checked field by field.

A spec file that lacks a field, has one this version does not know, or holds a value of the wrong
type is refused with the file and the field named, instead of a model of the wrong shape or a
KeyError deep inside `build`.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing

from ..errors import DistilleryError


class SpecError(DistilleryError):
    """A saved model shape that does not match this version's spec."""


def _check(value, hint, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _check(value, next(a for a in args if a is not type(None)), where)
    if dataclasses.is_dataclass(hint):
        return spec_from_json(hint, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected an object, got {type(value).__name__}")
        return {_check(k, args[0], f"{where} key"): _check(v, args[1], f"{where}[{k!r}]") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise SpecError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def spec_hash(spec) -> int:
    """A spec's hash, from its JSON (a frozen dataclass holding a dict field has no hash of its own)."""
    return hash(json.dumps(spec.to_json(), sort_keys=True))


def spec_from_json(cls, d, source: str):
    """`cls` (a spec dataclass) from its `to_json` dict; SpecError naming `source` and the field."""
    if not isinstance(d, dict):
        raise SpecError(f"{source}: expected an object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise SpecError(f"{source}: unknown field(s) {unknown}: written by another distillery version? "
                        f"Re-run the stage that saved it.")
    missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING]
    if missing:
        raise SpecError(f"{source}: missing field(s) {missing}: re-run the stage that saved it.")
    return cls(**{n: _check(v, hints[n], f"{source}: {n}") for n, v in d.items()})
