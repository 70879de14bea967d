"""The registry of methods: every :class:`~dsmoe.method.Method` by its config name, and lookups through their hooks.

To add a method, write its file (a transformation, its save/load and a ``Method``) and list it in ``REGISTRY``;
nothing else in the suite names it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dsmoe.baselines.llama_moe import LLAMA_MOE
from dsmoe.baselines.llm_pruner import LLM_PRUNER_BLOCK, LLM_PRUNER_CHANNEL
from dsmoe.baselines.sparsegpt import SPARSEGPT
from dsmoe.convert import DSMOE
from dsmoe.hf_remote.configuration_dsmoe import METHODS as REMOTE_METHODS
from dsmoe.matching import Match
from dsmoe.method import DENSE, Method

# DENSE last: it recognises any config.json the others do not
REGISTRY: dict[str, Method] = {
    m.name: m for m in (DSMOE, LLAMA_MOE, SPARSEGPT, LLM_PRUNER_CHANNEL, LLM_PRUNER_BLOCK, DENSE)
}


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {sorted(REGISTRY)}")
    return REGISTRY[name]


def method_of_saved(config: dict[str, Any]) -> str:
    """Name of the method that saved a model directory, from its config.json ("dense" if none).

    Reads the HF remote-code format (model_type "dsmoe", "dsmoe_llama_moe" or "dsmoe_llm_pruner", see
    dsmoe.hf_remote) and the earlier one (the base model_type plus the method's entry), and in-memory configs.
    """
    model_type = config.get("model_type")
    if model_type in REMOTE_METHODS:
        entry = REMOTE_METHODS[model_type][1]
        if not isinstance(config.get(entry), dict):
            raise ValueError(f"config.json has model_type {model_type!r} but no {entry!r} entry: an incomplete save")
    return next(m.name for m in REGISTRY.values() if m.recognises(config))


def method_of_model(model: nn.Module) -> Method:
    """The method of an in-memory model, from its config."""
    return get_method(method_of_saved(model.config.to_dict()))


def match_options(method: str, model: nn.Module, target: float, options: dict[str, Any] | None = None) -> Match:
    """The options that make ``method`` activate ``target`` params per token on the dense ``model``."""
    matchable = sorted(name for name, m in REGISTRY.items() if m.match is not None)
    match = get_method(method).match
    if match is None:
        raise ValueError(
            f"method {method!r} cannot be matched to a target: choose one of {matchable} (DSMoE's activation is "
            "learned, not set)"
        )
    return match(model, target, dict(options or {}))
