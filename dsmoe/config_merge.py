"""Configurations merged over their schema with OmegaConf (scale files, train configs, command-line overrides): the
unknown keys named by :func:`dsmoe.config_checks.reject_unknown_sections`, a refused value named with its key."""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, TupleConfig
from omegaconf.errors import OmegaConfBaseException

from dsmoe.config_checks import reject_unknown_sections


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


def dotted(key: str) -> str:
    """``data.sources[0].weight`` as ``data.sources.0.weight``."""
    return re.sub(r"\[(\d+)\]", r".\1", key)


def through_a_list(config: DictConfig, key: str) -> bool:
    """Whether the dotted ``key`` reaches into a list of ``config`` (``data.sources.0.weight``): a merge cannot."""
    parts = dotted(key.strip()).split(".")
    try:
        sequences = (ListConfig, TupleConfig)
        return any(isinstance(OmegaConf.select(config, ".".join(parts[:i])), sequences) for i in range(1, len(parts)))
    except OmegaConfBaseException:  # a list indexed by a name (data.sources.x.weight)
        return True


def set_in_list(config: DictConfig, override: str, where: str) -> None:
    """Apply ``key=value`` where ``key`` reaches into a list (``data.sources.0.weight=0.5``), in place; an index
    out of range, or an item that is not a mapping (a shorthand such as 'embedded:math'), is a ValueError."""
    key, _, value = override.partition("=")
    key = dotted(key.strip())
    override = f"{key}={value}"
    parent = key.rpartition(".")[0]
    try:
        item = OmegaConf.select(config, parent)
    except OmegaConfBaseException as error:
        raise ValueError(
            f"{where}: {override}: {str(error).splitlines()[0]} (a list's items are numbered from 0)"
        ) from None
    if not OmegaConf.is_config(item):
        outer = parent.rpartition(".")[0]
        items = OmegaConf.select(config, outer)
        found = f"{parent} is {item!r}" if item is not None else f"there is no {parent}"
        if isinstance(items, (ListConfig, TupleConfig)):
            found += f" ({outer} has {len(items)} item(s), from index 0)"
        raise ValueError(
            f"{where}: {override}: {found}, no mapping to set {key.rpartition('.')[2]!r} in; give the whole list "
            f"instead, e.g. {outer or parent}=[...]"
        )
    if isinstance(item, TupleConfig):
        raise ValueError(f"{where}: {override}: {parent} is a tuple, set whole: {parent}=[...]")
    try:
        config.merge_with_dotlist([override])  # the value parsed, and ${...} resolved, as in the whole config
    except (OmegaConfBaseException, TypeError) as error:
        message = " ".join(line.strip() for line in str(error).splitlines())
        raise ValueError(f"{where}: {override}: {message}") from error
