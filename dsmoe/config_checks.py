"""The unknown-key check of every configuration read from a mapping (YAML, saved config.json, method options)."""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict
from typing import Any, Self

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def reject_unknown_keys(given: Iterable[str], allowed: Iterable[str], what: str, where: str = "") -> None:
    """Raise ``ValueError("unknown <what> [<unknown keys>]<where>; allowed: [<allowed keys>]")`` when ``given`` holds
    a key outside ``allowed``; both lists sorted."""
    allowed = set(allowed)
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}{where}; allowed: {sorted(allowed)}")


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


def merged(base: Any, *configs: Any, schema: type, where: str) -> DictConfig:
    """``configs`` (mappings) merged in order over ``base`` (the structured ``schema`` or a config made from it):
    each checked for unknown keys (:func:`reject_unknown_sections`), every value's type checked by OmegaConf; a
    wrong type is a ValueError naming ``where`` and the key."""
    for config in configs:
        values = OmegaConf.to_container(config) if isinstance(config, DictConfig) else config
        if not isinstance(values, Mapping):
            raise ValueError(f"{where} must be a mapping of {sorted(typing.get_type_hints(schema))}, got {values!r}")
        reject_unknown_sections(values, schema, where)
    try:
        return OmegaConf.merge(base, *configs)
    except OmegaConfBaseException as error:
        message = " ".join(line.strip() for line in str(error).splitlines())
        named = "" if getattr(error, "full_key", None) else refused_value(base, configs)
        raise ValueError(f"{where}: {named}{message}") from error


def leaves(values: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested mapping; lists and empty mappings are leaves."""
    values = OmegaConf.to_container(values) if isinstance(values, DictConfig) else values
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def set_leaves(config: DictConfig, values: Any) -> list[tuple[str, Any]]:
    """Set every leaf of ``values`` on ``config`` (typed by its schema), in place; returns the (key, value) pairs
    the schema refused (an unknown key, a wrong type), which are left out."""
    refused = []
    for key, value in leaves(values):
        try:
            OmegaConf.update(config, key, value, merge=False)
        except OmegaConfBaseException:
            refused.append((key, value))
    return refused


def refused_value(base: Any, configs: tuple[Any, ...]) -> str:
    """``"key=value: "`` for the first value OmegaConf refuses to merge over ``base`` (its errors about a sequence's
    length or element type name neither), or ``""``."""
    trial = copy.deepcopy(base)
    for config in configs:
        refused = set_leaves(trial, config)
        if refused:
            return f"{refused[0][0]}={refused[0][1]!r}: "
    return ""


def options_check(config: type, method: str) -> Callable[[dict[str, Any], bool], None]:
    """A method's options check (``Method.check_options``) from its options dataclass: every key one of its fields;
    unless match_activated will set some of them, the values pass the dataclass's own checks."""

    def check(options: dict[str, Any], matched: bool) -> None:
        reject_unknown_keys(options, config.__dataclass_fields__, "option(s)", f" for method {method!r}")
        if not matched:
            config(**options)

    return check
