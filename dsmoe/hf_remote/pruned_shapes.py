"""Structural surgery of a Llama-family model to LLM-Pruner's shapes (Ma et al. 2023), and its rebuild from
the per-layer shapes recorded in config.json's "llm_pruner" entry, which a plain HF config cannot express.

channel mode: the hidden dimension d of every layer is cut to d' (embedding and lm_head columns, every
RMSNorm, q/k/v/gate/up input columns, o/down output rows; heads keep their head_dim and count). block mode:
per decoder layer, FFN intermediate channels (gate/up rows + down columns) and whole KV groups of attention
(k/v heads with the query heads that share them and their o_proj columns). HF remote code: copied into every
saved LLM-Pruner directory; imports only torch and transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
FFN_AND_NORMS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-family causal LM, checked for the modules LLM-Pruner prunes."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    needed = ATTENTION + FFN_AND_NORMS
    if layers is None or not all(_has(layer, n) for layer in layers for n in needed):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"LLM-Pruner needs a Llama-family model (model.model.layers[i] with {', '.join(needed)}); got {kind!r}"
        )
    return layers


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def qkv_projections(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    return layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj


def kv_groups(layer: nn.Module) -> int:
    return layer.self_attn.k_proj.out_features // layer.self_attn.head_dim


def intermediate_sizes(model: nn.Module) -> list[int]:
    return [layer.mlp.gate_proj.out_features for layer in decoder_layers(model)]


def kv_heads(model: nn.Module) -> list[int]:
    return [kv_groups(layer) for layer in decoder_layers(model)]


def hidden_params(model: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """(module, parameter name, axis) of every weight with an axis of size d (the residual stream)."""
    base = model.model
    entries: list[tuple[nn.Module, str, int]] = [(base.embed_tokens, "weight", 1)]
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        entries += [(layer.input_layernorm, "weight", 0), (layer.post_attention_layernorm, "weight", 0)]
        entries += [(m, "weight", 1) for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)]
        for m in (attn.o_proj, mlp.down_proj):
            entries += [(m, "weight", 0)] + ([(m, "bias", 0)] if m.bias is not None else [])
    entries.append((base.norm, "weight", 0))
    if model.lm_head.weight is not base.embed_tokens.weight:  # tied: the embedding already covers it
        entries.append((model.lm_head, "weight", 1))
    hidden = {id(getattr(m, name)) for m, name, _ in entries}
    output_side = [
        m.bias
        for layer in decoder_layers(model)
        for m in (*qkv_projections(layer), layer.mlp.gate_proj, layer.mlp.up_proj)
    ]
    independent = {id(b) for b in output_side if b is not None}  # q/k/v and gate/up biases: no hidden axis
    for name, p in model.named_parameters():
        if id(p) not in hidden | independent:
            raise ValueError(
                f"LLM-Pruner channel mode does not know how parameter {name} {tuple(p.shape)} depends on the "
                "hidden size; supported: Llama-family embed/norm/q,k,v,o/gate,up,down/lm_head weights and biases"
            )
    return entries


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def keep_rows(linear: nn.Linear, idx: torch.Tensor) -> None:
    _set_param(linear, "weight", linear.weight.detach().index_select(0, idx))
    if linear.bias is not None:
        _set_param(linear, "bias", linear.bias.detach().index_select(0, idx))
    linear.out_features = len(idx)


def keep_columns(linear: nn.Linear, idx: torch.Tensor) -> None:
    _set_param(linear, "weight", linear.weight.detach().index_select(1, idx))
    linear.in_features = len(idx)


def prune_hidden_channels(model: nn.Module, keep: torch.Tensor) -> None:
    """Keep hidden channels ``keep`` (sorted indices) in every layer; updates config.hidden_size, keeps head_dim."""
    entries = hidden_params(model)
    embed, lm_head = model.model.embed_tokens, model.lm_head
    tied = lm_head.weight is embed.weight
    keep = keep.to(embed.weight.device)
    model.config.head_dim = decoder_layers(model)[0].self_attn.head_dim  # else rebuilt from the new hidden_size
    for module, name, axis in entries:
        _set_param(module, name, getattr(module, name).detach().index_select(axis, keep))
        if isinstance(module, nn.Linear):
            setattr(module, "in_features" if axis == 1 else "out_features", len(keep))
    embed.embedding_dim = len(keep)
    if tied:
        lm_head.weight = embed.weight
    lm_head.in_features = len(keep)
    for layer in decoder_layers(model):
        if hasattr(layer.mlp, "hidden_size"):
            layer.mlp.hidden_size = len(keep)
    model.config.hidden_size = len(keep)


def prune_layer(layer: nn.Module, keep_ffn: torch.Tensor, keep_kv_groups: torch.Tensor) -> None:
    """Keep FFN channels ``keep_ffn`` and KV groups ``keep_kv_groups`` (sorted indices) of one decoder layer.

    Query head q belongs to KV group q // (heads/G), as HF's repeat_kv has it.
    """
    mlp, attn = layer.mlp, layer.self_attn
    device = mlp.gate_proj.weight.device
    keep_ffn, keep_kv_groups = keep_ffn.to(device), keep_kv_groups.to(device)
    keep_rows(mlp.gate_proj, keep_ffn)
    keep_rows(mlp.up_proj, keep_ffn)
    keep_columns(mlp.down_proj, keep_ffn)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep_ffn)
    head_dim, group_q = attn.head_dim, attn.q_proj.out_features // kv_groups(layer)
    kv_rows = (keep_kv_groups[:, None] * head_dim + torch.arange(head_dim, device=device)).flatten()
    q_rows = (keep_kv_groups[:, None] * group_q + torch.arange(group_q, device=device)).flatten()
    keep_rows(attn.q_proj, q_rows)
    keep_rows(attn.k_proj, kv_rows)
    keep_rows(attn.v_proj, kv_rows)
    keep_columns(attn.o_proj, q_rows)


def shrink_to_spec(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Give a model built at the dense shapes the pruned shapes of ``spec`` (config.json's "llm_pruner" entry:
    mode, hidden_size, intermediate_sizes and num_key_value_heads per layer); weights are loaded afterwards."""
    layers = decoder_layers(model)
    for key in ("intermediate_sizes", "num_key_value_heads"):
        if len(spec[key]) != len(layers):
            raise ValueError(f"llm_pruner {key} has {len(spec[key])} entries for a model of {len(layers)} layers")
    if spec["mode"] == "channel":
        prune_hidden_channels(model, torch.arange(spec["hidden_size"]))
    for layer, f, g in zip(layers, spec["intermediate_sizes"], spec["num_key_value_heads"], strict=True):
        prune_layer(layer, torch.arange(f), torch.arange(g))
    return model
