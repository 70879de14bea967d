"""DSMoE: matrix-partitioned experts with dynamic routing for dense LLaMA-family models."""

from dsmoe.config import DSMoEConfig
from dsmoe.convert import convert, dsmoe_config_of, load, save, set_rescale, set_tau
from dsmoe.layer import DSMoEMLP
from dsmoe.losses import dsmoe_layers, sparsity_loss
from dsmoe.stats import ActivationStats, activation_stats, count_params, reset_activation_stats

__all__ = [
    "ActivationStats",
    "DSMoEConfig",
    "DSMoEMLP",
    "activation_stats",
    "convert",
    "count_params",
    "dsmoe_config_of",
    "dsmoe_layers",
    "load",
    "reset_activation_stats",
    "save",
    "set_rescale",
    "set_tau",
    "sparsity_loss",
]
