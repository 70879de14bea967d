"""Dense HF Llama-family model ↔ DSMoE: conversion, save and load, and DSMoE as a :class:`~dsmoe.method.Method`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from dsmoe.config import DSMoEConfig
from dsmoe.config_checks import options_check
from dsmoe.hf_remote.partitioned_swiglu import replace_swiglu, swiglu_parts
from dsmoe.layer import DSMoEMLP
from dsmoe.losses import sparsity_loss
from dsmoe.method import Batches, DynamicActivation, Method, ffn_widths
from dsmoe.saving import load_with_extra_params, save_hf, saved_entry
from dsmoe.stats import (
    activation_stats,
    all_reduce_activation_counts,
    count_only,
    merge_activation_counts,
    reset_activation_stats,
)


def convert(model: PreTrainedModel, config: DSMoEConfig) -> PreTrainedModel:
    """Replace every SwiGLU MLP (gate_proj/up_proj/down_proj) by a DSMoEMLP sharing its weights (eq. 6).

    Routers are initialised N(0, std²) with std = config.router_init_std or the model's
    initializer_range. Records the DSMoE config on ``model.config.dsmoe`` for save/load.
    """
    if any(isinstance(m, DSMoEMLP) for m in model.modules()):
        raise ValueError(
            "model is already converted to DSMoE: convert a dense model (a DSMoE run continues from its checkpoints "
            "with resume=last; dsmoe.load opens a saved one)"
        )
    std = config.router_init_std or getattr(model.config, "initializer_range", 0.02)

    def layer(mlp: nn.Module) -> DSMoEMLP:
        new = DSMoEMLP(swiglu_parts(mlp), config)
        nn.init.normal_(new.router.weight, mean=0.0, std=std)
        return new

    replace_swiglu(model, layer)
    model.config.dsmoe = config.to_dict()
    return model


def set_tau(model: nn.Module, tau: float) -> None:
    """Change the threshold τ of every DSMoE layer (Table 4, Fig. 2); a model without one is a ValueError."""
    DSMoEConfig(tau=tau)  # validates
    layers = [m for m in model.modules() if isinstance(m, DSMoEMLP)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no DSMoE layer to set τ in: convert it first (dsmoe.convert)")
    for m in layers:
        m.tau = float(tau)
    if hasattr(model, "config") and hasattr(model.config, "dsmoe"):
        model.config.dsmoe = {**model.config.dsmoe, "tau": float(tau)}


def set_rescale(model: nn.Module, rescale: bool) -> None:
    """Switch eq. 8's n/#active rescale of every DSMoE layer on or off (evaluation only: Fig. 2 reports the model
    trained without G(x), which also trained without the rescale, both ways)."""
    for m in model.modules():
        if isinstance(m, DSMoEMLP):
            m.rescale = bool(rescale)


def dsmoe_config_of(model: nn.Module) -> DSMoEConfig:
    return DSMoEConfig.from_dict(dict(model.config.dsmoe))


def save(model: PreTrainedModel, directory: str | Path, tokenizer=None) -> Path:
    """Save a converted model: HF format (dense weights + routers, config.json with a "dsmoe" entry) with HF
    remote code, so that ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` opens it as DSMoE."""
    if not hasattr(model.config, "dsmoe"):
        raise ValueError("save() expects a model converted with dsmoe.convert()")
    return save_hf(model, directory, tokenizer, remote_model_type="dsmoe")


def load(directory: str | Path, dtype: torch.dtype | None = None, **from_pretrained_kwargs) -> PreTrainedModel:
    """Load a model written by :func:`save` (or by the suite before saves had remote code) with its routers,
    n, τ and variant.

    The dense weights load through ``from_pretrained`` (sharding, dtype, device_map); the routers
    are then read from the same safetensors files.
    """
    config = DSMoEConfig.from_dict(dict(saved_entry(directory, "dsmoe")))
    return load_with_extra_params(
        directory, lambda m: convert(m, config), lambda k: k.endswith("router.weight"), dtype, **from_pretrained_kwargs
    )


def describe(model: nn.Module) -> str:
    """Table 1's Configuration: d and the expert width × n."""
    n = dsmoe_config_of(model).num_experts
    return f"d={model.config.hidden_size}, D={ffn_widths(model)[0] // n}x{n}"


def _apply(model: PreTrainedModel, options: dict[str, Any], calib: Batches | None) -> PreTrainedModel:
    return convert(model, DSMoEConfig(**options))


def _aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """λ · L_sparse (eq. 18), added to L_LM (eq. 19)."""
    return {"sparsity": dsmoe_config_of(model).sparsity_weight * sparsity_loss(model)}


DYNAMIC_ACTIVATION = DynamicActivation(
    reset=reset_activation_stats,
    stats=activation_stats,
    merge=merge_activation_counts,
    all_reduce=all_reduce_activation_counts,
    count_only=count_only,
    set_threshold=set_tau,
    set_rescale=set_rescale,
    threshold=lambda model: dsmoe_config_of(model).tau,
)

DSMOE = Method(
    "dsmoe",
    _apply,
    _aux_losses,
    lambda model: activation_stats(model).activated_params,  # accumulated since the last reset
    save,
    load,
    recognises=lambda config: "dsmoe" in config,
    describe=describe,
    dynamic=DYNAMIC_ACTIVATION,
    check_options=options_check(DSMoEConfig, "dsmoe"),
    experts=lambda options: options.get("num_experts", DSMoEConfig.num_experts),
)
