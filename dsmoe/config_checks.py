"""The unknown-key check of every configuration read from a mapping (YAML, saved config.json, method options)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any, Self


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
