"""The unknown-key check of every configuration read from a mapping (YAML, saved config.json, method options)."""

from __future__ import annotations

from collections.abc import Iterable


def reject_unknown_keys(given: Iterable[str], allowed: Iterable[str], what: str, where: str = "") -> None:
    """Raise ``ValueError("unknown <what> [<unknown keys>]<where>; allowed: [<allowed keys>]")`` when ``given`` holds
    a key outside ``allowed``; both lists sorted."""
    allowed = set(allowed)
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}{where}; allowed: {sorted(allowed)}")
