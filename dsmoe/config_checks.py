"""The unknown-key check of every configuration read from a mapping (YAML, saved config.json, method options).

No dependency beyond the standard library: the method (config, convert) uses it."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Self


def reject_unknown_keys(given: Iterable[str], allowed: Iterable[str], what: str, where: str = "") -> None:
    """Raise ``ValueError("unknown <what> [<unknown keys>]<where>; allowed: [<allowed keys>]")`` when ``given`` holds
    a key outside ``allowed``; both lists sorted."""
    allowed = set(allowed)
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}{where}; allowed: {sorted(allowed)}")


def is_plain_name(name: str) -> bool:
    """A name that is one path component: no separator, no '..', not empty (it names a file or folder)."""
    return bool(name) and Path(name).name == name and "\\" not in name and ".." not in name


class StoredConfig:
    """``to_dict`` / ``from_dict`` for a dataclass configuration stored in config.json (e.g. the "dsmoe" entry);
    ``from_dict`` refuses unknown keys, naming them and the allowed ones."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        reject_unknown_keys(d, cls.__dataclass_fields__, f"{cls.__name__} keys")
        return cls(**d)


def reject_unknown_sections(values: Mapping, schema: type, where: str, section: str = "") -> None:
    """The unknown-key check of ``values`` against the dataclass ``schema`` and of each of its sections that is a
    dataclass itself (e.g. a train config's ``trainer``); the error names the keys with their section (e.g.
    'trainer.devics'), ``where`` the values come from, and the keys allowed in that section."""
    fields = typing.get_type_hints(schema)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        inside = f"; allowed in {section}: " if section else "; allowed: "
        raise ValueError(
            f"unknown key(s) {[section + '.' * bool(section) + k for k in unknown]} in {where}{inside}{sorted(fields)}"
        )
    for key, value in values.items():
        if dataclasses.is_dataclass(fields[key]) and isinstance(value, Mapping):
            reject_unknown_sections(value, fields[key], where, f"{section}.{key}" if section else key)


def options_check(config: type, method: str) -> Callable[[dict[str, Any], bool], None]:
    """A method's options check (``Method.check_options``) from its options dataclass: every key one of its fields;
    unless match_activated will set some of them, the values pass the dataclass's own checks."""

    def check(options: dict[str, Any], matched: bool) -> None:
        reject_unknown_keys(options, config.__dataclass_fields__, "option(s)", f" for method {method!r}")
        if not matched:
            config(**options)

    return check
