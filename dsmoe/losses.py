"""Auxiliary losses of DSMoE as standalone functions of a converted model."""

from __future__ import annotations

import torch
from torch import nn

from dsmoe.layer import DSMoEMLP


def dsmoe_layers(model: nn.Module) -> list[DSMoEMLP]:
    """The DSMoE FFNs of a model, in layer order."""
    return [m for m in model.modules() if isinstance(m, DSMoEMLP)]


def sparsity_loss(model: nn.Module) -> torch.Tensor:
    """L_sparse = 1/(L·N) Σ_l Σ_n G(σ(x·Y_n)) averaged over tokens, for the last forward (eq. 19).

    For the "no_gate" variant in training the soft σ(x·Y_n) is used (the L1 norm of eq. 20's
    weights). Differentiable with respect to the routers and, through their inputs, every parameter below them.
    """
    layers = dsmoe_layers(model)
    if not layers:
        raise ValueError(
            "sparsity_loss needs a model converted with dsmoe.convert(); none of its modules is a DSMoEMLP"
        )
    terms = []
    for layer in layers:
        if layer.last_gates is None:
            raise RuntimeError("sparsity_loss needs a forward pass of the model first")
        g = layer.last_gates
        if not (layer.training and layer.variant == "no_gate"):
            g = g * layer.last_active  # G(g): gates at or below τ contribute 0
        terms.append(g.mean())
    return torch.stack(terms).mean()
