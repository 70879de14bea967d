"""Activation statistics: active experts per layer and activated parameters (Table 1 accounting)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsmoe.distributed import all_reduce_sum
from dsmoe.losses import dsmoe_layers


@dataclass
class ActivationStats:
    """Mean active experts per layer and the model's activated parameters per token.

    ``mean_active_per_layer`` is accumulated over every eval-mode forward since the last
    :func:`reset_activation_stats` (falling back to the last forward when nothing was accumulated);
    ``last_active_per_layer`` is the last forward's. Activated params count every non-FFN parameter
    plus each FFN's parameters times its active fraction, as Table 1 does.
    """

    num_experts: int
    mean_active_per_layer: list[float]
    last_active_per_layer: list[float]
    expert_frequency: list[list[float]]  # [layer][expert]: fraction of tokens routed to the expert
    tokens: int
    total_params: int
    activated_params: float

    @property
    def mean_active(self) -> float:
        return sum(self.mean_active_per_layer) / max(len(self.mean_active_per_layer), 1)

    @property
    def activated_fraction(self) -> float:
        return self.activated_params / self.total_params


@dataclass(frozen=True)
class ParamCounts:
    """The parameter counts activation statistics need, taken from the unsharded model: under FSDP a process holds
    only shards, so counting there gives about 1/world_size of the truth."""

    total: int
    ffn: list[int]  # per DSMoE layer, its three projections (the router excluded)


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def ffn_params(layer: nn.Module) -> int:
    return sum(p.numel() for name, p in layer.named_parameters() if not name.startswith("router"))


def param_counts(model: nn.Module) -> ParamCounts:
    """Counts of an unsharded model (call before wrapping it for FSDP)."""
    return ParamCounts(count_params(model), [ffn_params(layer) for layer in dsmoe_layers(model)])


def activation_stats(model: nn.Module, last: bool = False, params: ParamCounts | None = None) -> ActivationStats:
    """Per-layer mean number of active experts and the average activated parameter count.

    By default over everything accumulated in eval mode since the last reset (the last forward if
    nothing was); ``last=True`` uses the last forward only (training). ``params``: counts taken before the model
    was sharded (default: counted now)."""
    layers = dsmoe_layers(model)
    if not layers:
        raise ValueError("activation_stats needs a model converted with dsmoe.convert()")
    params = params or param_counts(model)
    n, device = layers[0].num_experts, layers[0].router.weight.device
    # last forward's fraction of tokens per expert, [layers, n], brought to the host at once (one sync per call)
    last_freq = torch.stack(
        [
            torch.full((n,), float("nan"), device=device)
            if (a := layer.last_active) is None
            else a.float().mean(0).to(device)
            for layer in layers
        ]
    ).cpu()
    freq = [
        torch.tensor(layer.expert_tokens, dtype=torch.float64).div(layer.tokens_seen).float()
        if not last and layer.tokens_seen > 0
        else (f if not f.isnan().any() else torch.ones(n))
        for layer, f in zip(layers, last_freq, strict=True)
    ]
    last_counts = last_freq.sum(1).tolist()
    freq = torch.stack(freq).tolist()
    mean = [sum(f) for f in freq]
    total = params.total
    inactive = sum(ffn * (1 - m / layer.num_experts) for layer, ffn, m in zip(layers, params.ffn, mean, strict=True))
    return ActivationStats(
        num_experts=layers[0].num_experts,
        mean_active_per_layer=mean,
        last_active_per_layer=last_counts,
        expert_frequency=freq,
        tokens=layers[0].tokens_seen,
        total_params=total,
        activated_params=total - inactive,
    )


def reset_activation_stats(model: nn.Module) -> None:
    """Zero the accumulated eval-mode activation counters of every DSMoE layer."""
    for layer in dsmoe_layers(model):
        layer.reset_stats()


def count_only(model: nn.Module, rows: torch.Tensor | None) -> None:
    """Count only the token positions where ``rows`` (bool [batch, seq]) is True in the next eval forwards' activation
    statistics (a padded batch: its real tokens); None: every position. No host sync."""
    count = None if rows is None else rows.sum()  # once for every layer, on rows' device
    for layer in dsmoe_layers(model):
        layer.count_only(rows, count)


def merge_activation_counts(model: nn.Module, replicas: list[nn.Module]) -> None:
    """Add the eval-mode counters of replicas of ``model`` (data-parallel evaluation) to the model's own."""
    for replica in replicas:
        for layer, other in zip(dsmoe_layers(model), dsmoe_layers(replica), strict=True):
            layer.count_active(other.expert_tokens, other.tokens_seen)


def all_reduce_activation_counts(model: nn.Module) -> None:
    """Replace each DSMoE layer's eval-mode counters (tokens per expert, tokens) by their sums over all processes."""
    layers = dsmoe_layers(model)
    device = layers[0].router.weight.device
    counts = torch.tensor([[*layer.expert_tokens, layer.tokens_seen] for layer in layers], dtype=torch.float64)
    counts = all_reduce_sum(counts.to(device)).cpu()
    for layer, row in zip(layers, counts.tolist(), strict=True):
        layer.reset_stats([round(c) for c in row[:-1]], round(row[-1]))
