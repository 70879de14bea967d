"""One training path for every method: a model transformation plus a small hook interface.

A :class:`Method` turns a dense pre-trained model into the model to train (DSMoE conversion, top-k
MoE, pruning), names its auxiliary losses, optionally acts after each optimizer step (e.g. keeping
pruning masks), and reports its activated parameters per token. The LightningModule only calls
these hooks; it never branches on the method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from dsmoe.hf_remote.configuration_dsmoe import METHODS as REMOTE_METHODS
from dsmoe.stats import count_params

Batches = Iterable[torch.Tensor]  # calibration input_ids batches, for methods that need data


@dataclass(frozen=True)
class Method:
    """name; apply(model, options, calib_batches) -> model; aux_losses(model) -> {name: weighted loss};
    activated_params(model) -> params per token; save(model, dir, tokenizer) -> dir; load(dir) -> model;
    on_train_start(model) once the Trainer has wrapped (possibly sharded) the model; after_optimizer_step(model)."""

    name: str
    apply: Callable[[PreTrainedModel, dict[str, Any], Batches | None], PreTrainedModel]
    aux_losses: Callable[[nn.Module], dict[str, torch.Tensor]]
    activated_params: Callable[[nn.Module], float]
    save: Callable[[nn.Module, Path, Any], Path]
    load: Callable[[Path], nn.Module]
    after_optimizer_step: Callable[[nn.Module], None] | None = None
    needs_calibration: bool = False
    on_train_start: Callable[[nn.Module], None] | None = None


def no_aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    return {}


def _all_params(model: nn.Module) -> float:
    return float(count_params(model))


def _dense_apply(model: PreTrainedModel, options: dict[str, Any], calib: Batches | None) -> PreTrainedModel:
    if options:
        raise ValueError(f"method 'dense' takes no options, got {sorted(options)}")
    return model


def _dsmoe_apply(model: PreTrainedModel, options: dict[str, Any], calib: Batches | None) -> PreTrainedModel:
    from dsmoe.config import DSMoEConfig
    from dsmoe.convert import convert

    return convert(model, DSMoEConfig(**options))


def _dsmoe_aux(model: nn.Module) -> dict[str, torch.Tensor]:
    from dsmoe.convert import dsmoe_config_of
    from dsmoe.losses import sparsity_loss

    return {"sparsity": dsmoe_config_of(model).sparsity_weight * sparsity_loss(model)}


def _dsmoe_activated(model: nn.Module) -> float:
    from dsmoe.stats import activation_stats

    return activation_stats(model).activated_params


def save_pretrained(model: nn.Module, directory: Path, tokenizer: Any = None) -> Path:
    """Plain HF save (for methods whose model transformers can rebuild from config.json)."""
    from dsmoe.saving import save_hf

    return save_hf(model, directory, tokenizer)


def from_pretrained(directory: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory)


def _dsmoe_save(model: nn.Module, directory: Path, tokenizer: Any = None) -> Path:
    from dsmoe.convert import save

    return save(model, directory, tokenizer)


def _dsmoe_load(directory: Path) -> nn.Module:
    from dsmoe.convert import load

    return load(directory)


DENSE = Method("dense", _dense_apply, no_aux_losses, _all_params, save_pretrained, from_pretrained)
DSMOE = Method("dsmoe", _dsmoe_apply, _dsmoe_aux, _dsmoe_activated, _dsmoe_save, _dsmoe_load)

REGISTRY: dict[str, Method] = {m.name: m for m in (DENSE, DSMOE)}


def _register_baselines() -> None:
    """Baselines import this module, so they join the registry on first lookup."""
    from dsmoe.baselines.llm_pruner import LLM_PRUNER_BLOCK, LLM_PRUNER_CHANNEL
    from dsmoe.baselines.sparsegpt import SPARSEGPT
    from dsmoe.baselines.topk_moe import TOPK_MOE

    for method in (TOPK_MOE, SPARSEGPT, LLM_PRUNER_CHANNEL, LLM_PRUNER_BLOCK):
        REGISTRY.setdefault(method.name, method)


def get_method(name: str) -> Method:
    _register_baselines()
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
    if "llm_pruner" in config:
        return f"llm_pruner_{config['llm_pruner']['mode']}"
    for key in ("dsmoe", "llama_moe", "sparsegpt"):
        if key in config:
            return key
    return "dense"
