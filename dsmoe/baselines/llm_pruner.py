"""LLM-Pruner baseline (Ma et al. 2023): one-shot structured pruning by first-order Taylor importance.

Importance ("param_first", group reduction "sum", the defaults of LLM-Pruner's llama3.py): with g the
gradient of the mean LM loss over a few calibration batches, each weight gets the salience |w·g| and a
prunable structure (a coupled group of rows/columns) the sum of the saliences of all its weights
(biases included; LLaMA has none). The lowest-importance structures are removed in one shot.

Two variants, as in DSMoE Table 1:

* channel: prune the hidden dimension d of every layer consistently (embedding and lm_head columns,
  every RMSNorm weight, q/k/v/gate/up input columns, o/down output rows). Heads keep their head_dim and
  count. The RMSNorms then normalise over d' < d channels: the mean of x² is taken over fewer entries,
  which rescales every normalised activation — inherent to the method (LLM-Pruner does not compensate).
* block: per decoder layer in [keep_first, L - keep_last) (LLM-Pruner prunes layers 4..29 of LLaMA-7B's
  32), remove FFN intermediate channels (gate/up rows + down columns) and whole KV groups of attention
  (k/v heads with the query heads that share them and their o_proj columns), both with the same ratio r
  by LLM-Pruner's local rule: keep int(D·(1-r)) channels, drop ⌊(G·h - int(G·h·(1-r)))/h⌋ of G groups.
  Query head q belongs to KV group q // (heads/G), as HF's repeat_kv has it (LLM-Pruner's llama3.py aligns
  query to key importances by a reshape that pairs q with q mod G instead).

The pruned model is dense: its activated parameters are its parameters. :func:`plan` gives the shapes for
LLM-Pruner's ``pruning_ratio`` or for a parameter budget (d' in closed form, the count being linear in d';
r by bisection, then the FFN ratio alone so that whole-head steps do not spoil the match);
:func:`prune_to_target` = plan + importance + surgery. Per-layer shapes live in ``config.llm_pruner``;
:func:`load_llm_pruner` rebuilds them, and so does the HF remote code saved with them (plain ``from_pretrained``
cannot). The surgery itself lives in :mod:`dsmoe.hf_remote.pruned_shapes`, shared with that remote code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from dsmoe.config_checks import reject_unknown_keys
from dsmoe.hf_remote.pruned_shapes import (
    decoder_layers,
    hidden_params,
    intermediate_sizes,
    kv_groups,
    kv_heads,
    prune_hidden_channels,
    prune_layer,
    qkv_projections,
    shrink_to_spec,
)
from dsmoe.matching import Match, refuse_far_miss, resolve_target
from dsmoe.method import Method, all_params, ffn_widths, no_aux_losses
from dsmoe.saving import base_config, read_tensors, save_hf
from dsmoe.stats import count_params

MODES = ("channel", "block")


# ---------------------------------------------------------------------------------------------- importance


HOST_GRAD = "taylor_grad_on_host"  # parameter attribute: its gradient, kept in host memory (see taylor_gradients)


@contextmanager
def taylor_gradients(
    model: PreTrainedModel,
    calib_batches: Iterable[torch.Tensor],
    num_batches: int | None = None,
    on_host: bool | None = None,
):
    """Give every parameter ∂L/∂p of the LM loss averaged over the calibration batches, then clear them.

    Like LLM-Pruner (one backward of the mean loss over its calibration samples), computed on the dense
    model in eval mode; requires_grad flags and train/eval mode are restored on exit. ``on_host`` (default:
    when the model is on a GPU) accumulates each gradient in host memory as backward produces it, instead of
    in ``p.grad``: a 7B model's fp32 gradients (27 GB) would not fit beside its weights on a 40 GB GPU. The
    sums are the same (fp32 additions in the same order); the importance functions read either place.
    """
    batches = list(islice(calib_batches, num_batches) if num_batches else calib_batches)
    if not batches:
        raise ValueError("LLM-Pruner's Taylor importance needs at least one calibration batch of input_ids")
    for ids in batches:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"calibration batches must be [batch, seq] integer input_ids tensors, got {ids!r:.80}")
    params = list(model.parameters())
    flags, was_training = [p.requires_grad for p in params], model.training
    device = params[0].device
    if on_host is None:
        on_host = device.type == "cuda"
    hooks = []
    model.zero_grad(set_to_none=True)
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        if on_host:  # hooks need requires_grad
            hooks = [p.register_post_accumulate_grad_hook(_grad_to_host) for p in params]
        for ids in batches:
            ids = ids.to(device)
            (model(input_ids=ids, labels=ids).loss / len(batches)).backward()
        yield
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
            if hasattr(p, HOST_GRAD):
                delattr(p, HOST_GRAD)
        model.train(was_training)


def _grad_to_host(p: torch.Tensor) -> None:
    """Backward hook: add p.grad to p's host-memory sum and free it on the device."""
    total = getattr(p, HOST_GRAD, None)
    if total is None:
        setattr(p, HOST_GRAD, p.grad.to("cpu"))
    else:
        total += p.grad.to("cpu")
    p.grad = None


def _salience(p: torch.Tensor) -> torch.Tensor:
    """Element-wise first-order Taylor importance |w·∂L/∂w| ("param_first")."""
    grad = p.grad if p.grad is not None else getattr(p, HOST_GRAD, None)
    if grad is None:
        raise RuntimeError("no gradient on a parameter: compute importance inside taylor_gradients(model, batches)")
    return (p.detach().float() * grad.to(p.device).float()).abs()


def _row_importance(linear: nn.Linear) -> torch.Tensor:
    """Per output unit: Σ over its weight row (and its bias)."""
    imp = _salience(linear.weight).sum(1)
    return imp + _salience(linear.bias) if linear.bias is not None else imp


def _column_importance(linear: nn.Linear) -> torch.Tensor:
    return _salience(linear.weight).sum(0)


def hidden_importance(model: PreTrainedModel) -> torch.Tensor:
    """[d]: summed salience of every weight attached to each hidden channel (the channel-wise group)."""
    total = torch.zeros(model.config.hidden_size, device=model.lm_head.weight.device)
    for module, name, axis in hidden_params(model):
        s = _salience(getattr(module, name))
        total += s.sum(1 - axis) if s.dim() == 2 else s
    return total


def ffn_importance(layer: nn.Module) -> torch.Tensor:
    """[D]: salience of gate/up rows plus down columns, per intermediate channel."""
    mlp = layer.mlp
    return _row_importance(mlp.gate_proj) + _row_importance(mlp.up_proj) + _column_importance(mlp.down_proj)


def kv_group_importance(layer: nn.Module) -> torch.Tensor:
    """[G]: salience of each KV group: its k/v heads, the query heads that attend with them, their o columns.

    Query head h uses KV head h // (num_heads / G) (HF repeat_kv), so a group's query rows are contiguous.
    """
    attn, groups = layer.self_attn, kv_groups(layer)
    parts = (*(_row_importance(m) for m in qkv_projections(layer)), _column_importance(attn.o_proj))
    return sum(part.view(groups, -1).sum(1) for part in parts)


# ---------------------------------------------------------------------------------------------- pruning


def _top(importance: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(importance, k).indices.sort().values


def prune_channel(
    model: PreTrainedModel, hidden_size: int, calib_batches: Iterable[torch.Tensor], num_batches: int | None = None
) -> PreTrainedModel:
    """Channel-wise LLM-Pruner: keep the ``hidden_size`` most important hidden channels (in place)."""
    d = model.config.hidden_size
    if not 1 <= hidden_size <= d:
        raise ValueError(f"hidden_size must be in [1, {d}], got {hidden_size}")
    dense = _dense_params(model)
    with taylor_gradients(model, calib_batches, num_batches):
        keep = _top(hidden_importance(model), hidden_size)
    prune_hidden_channels(model, keep)
    _record_spec(model, "channel", dense)
    return model


def prune_block(
    model: PreTrainedModel,
    ffn_sizes: list[int],
    kv_group_counts: list[int],
    calib_batches: Iterable[torch.Tensor],
    num_batches: int | None = None,
) -> PreTrainedModel:
    """Block-wise LLM-Pruner: per layer i keep the ffn_sizes[i] most important FFN channels and the
    kv_group_counts[i] most important KV groups (in place)."""
    layers = decoder_layers(model)
    current, groups = intermediate_sizes(model), kv_heads(model)
    for name, sizes, limit in (("ffn_sizes", ffn_sizes, current), ("kv_group_counts", kv_group_counts, groups)):
        if len(sizes) != len(layers) or not all(1 <= s <= m for s, m in zip(sizes, limit, strict=True)):
            raise ValueError(f"{name} must give one size in [1, current] per layer (current {limit}), got {sizes}")
    dense = _dense_params(model)
    with taylor_gradients(model, calib_batches, num_batches):
        keeps = [
            (_top(ffn_importance(layer), f), _top(kv_group_importance(layer), g))
            for layer, f, g in zip(layers, ffn_sizes, kv_group_counts, strict=True)
        ]
    for layer, (keep_ffn, keep_kv) in zip(layers, keeps, strict=True):
        prune_layer(layer, keep_ffn, keep_kv)
    _record_spec(model, "block", dense)
    return model


def _dense_params(model: PreTrainedModel) -> int:
    spec = getattr(model.config, "llm_pruner", None)
    return spec["dense_params"] if spec else count_params(model)


def _record_spec(model: PreTrainedModel, mode: str, dense_params: int) -> None:
    """Store the per-layer shapes on config.llm_pruner (HF configs cannot express per-layer sizes)."""
    model.config.llm_pruner = {
        "mode": mode,
        "hidden_size": model.config.hidden_size,
        "intermediate_sizes": intermediate_sizes(model),
        "num_key_value_heads": kv_heads(model),
        "params": count_params(model),
        "dense_params": dense_params,
    }


# ---------------------------------------------------------------------------------------------- matching


def channel_param_count(model: PreTrainedModel, hidden_size: int) -> int:
    """Parameters after pruning d to ``hidden_size``: linear in it (every hidden-axis weight scales with d')."""
    per_channel = sum(getattr(m, n).numel() // model.config.hidden_size for m, n, _ in hidden_params(model))
    return count_params(model) + per_channel * (hidden_size - model.config.hidden_size)


def _ffn_unit(layer: nn.Module) -> int:
    m = layer.mlp
    return (
        m.gate_proj.in_features
        + m.up_proj.in_features
        + m.down_proj.out_features
        + sum(x.bias is not None for x in (m.gate_proj, m.up_proj))
    )


def _kv_unit(layer: nn.Module) -> int:
    """Parameters per KV group: q/k/v rows (weights and biases) and o_proj columns of its heads."""
    qkv = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in qkv_projections(layer))
    return (qkv + layer.self_attn.o_proj.weight.numel()) // kv_groups(layer)


def block_param_count(model: PreTrainedModel, ffn_sizes: list[int], kv_group_counts: list[int]) -> int:
    """Parameters after :func:`prune_block` with these per-layer sizes (from the module shapes)."""
    total = count_params(model)
    for layer, f, g in zip(decoder_layers(model), ffn_sizes, kv_group_counts, strict=True):
        total += _ffn_unit(layer) * (f - layer.mlp.gate_proj.out_features) + _kv_unit(layer) * (g - kv_groups(layer))
    return total


def pruned_layer_range(num_layers: int, keep_first: int, keep_last: int) -> range:
    if keep_first < 0 or keep_last < 0 or keep_first + keep_last >= num_layers:
        raise ValueError(
            f"keep_first={keep_first} and keep_last={keep_last} leave no layer of {num_layers} to prune; "
            f"need keep_first, keep_last >= 0 and keep_first + keep_last < {num_layers}"
        )
    return range(keep_first, num_layers - keep_last)


def block_sizes(
    model: PreTrainedModel, ratio: float, layers: range, prune_attention: bool = True, ffn_ratio: float | None = None
) -> tuple[list[int], list[int]]:
    """LLM-Pruner's local rule for pruning ratio r in the given layers: keep int(D·(1-r)) FFN channels and
    drop ⌊(G·h - int(G·h·(1-r)))/h⌋ KV groups (at least one channel and one group stay)."""
    ffn, kv = intermediate_sizes(model), kv_heads(model)
    ffn_ratio = ratio if ffn_ratio is None else ffn_ratio
    decoder = decoder_layers(model)
    for i in layers:
        head_dim = decoder[i].self_attn.head_dim
        ffn[i] = max(1, int(ffn[i] * (1 - ffn_ratio)))
        if prune_attention:
            channels = kv[i] * head_dim
            kv[i] = max(1, kv[i] - (channels - int(channels * (1 - ratio))) // head_dim)
    return ffn, kv


def _bisect(count: Callable[[float], int], target: float) -> tuple[float, float]:
    """(lo, hi) ratios, 2⁻⁴⁰ apart, with count(lo) > target >= count(hi) for a non-increasing count(r)."""
    if count(0.0) <= target:
        return 0.0, 0.0
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) > target else (lo, mid)
    return lo, hi


def channel_plan(model: PreTrainedModel, target_params: float, round_to: int = 1) -> int:
    """The hidden size whose parameter count is nearest the target (a multiple of round_to)."""
    d = model.config.hidden_size
    per_channel = channel_param_count(model, d) - channel_param_count(model, d - 1)
    fixed = channel_param_count(model, 0)
    smallest = channel_param_count(model, round_to)
    if not smallest <= target_params <= count_params(model):
        raise ValueError(
            f"target {target_params:.0f} params is outside [{smallest}, {count_params(model)}] for channel mode"
        )
    return min(d, max(round_to, round((target_params - fixed) / per_channel / round_to) * round_to))


def block_plan(
    model: PreTrainedModel, target_params: float, layers: range, prune_attention: bool = True
) -> tuple[list[int], list[int], float]:
    """Per-layer FFN sizes and KV-group counts (and the ratio r) for a parameter budget.

    r is bisected so that LLM-Pruner's rule meets the target; the FFN ratio is then bisected alone with the
    KV groups of r fixed, so that the coarse head steps do not stop the count from landing near the target.
    """

    def count(r: float, ffn_r: float | None = None) -> int:
        return block_param_count(model, *block_sizes(model, r, layers, prune_attention, ffn_r))

    smallest = count(1.0)
    if not smallest <= target_params <= count_params(model):
        raise ValueError(
            f"target {target_params:.0f} params is outside [{smallest}, {count_params(model)}] for block mode "
            f"pruning layers {layers.start}..{layers.stop - 1}"
        )
    ratio = _bisect(count, target_params)[1]
    lo, hi = _bisect(lambda f: count(ratio, f), target_params)
    ffn_ratio = min((lo, hi), key=lambda f: abs(count(ratio, f) - target_params))
    ffn, kv = block_sizes(model, ratio, layers, prune_attention, ffn_ratio)
    return ffn, kv, ratio


def plan(
    model: PreTrainedModel,
    mode: str,
    *,
    target_params: float | None = None,
    pruning_ratio: float | None = None,
    keep_first: int = 4,
    keep_last: int = 2,
    prune_attention: bool = True,
    round_to: int = 1,
) -> dict[str, Any]:
    """The shapes and parameter count that pruning will produce, for a parameter budget or for LLM-Pruner's own
    ``pruning_ratio`` (exactly one); needs no data and works on a meta-device model.

    channel: d' = d - n with n = d - int(d·(1-r)) rounded down to round_to (LLM-Pruner), or, for a budget, the
    count is linear in d' and d' is solved in closed form (granularity: the params of one hidden channel,
    V + L·(q+k+v+o+3D) + ...: ~1.5% of a tiny test model, 0.05% of Llama-3.2-1B). block: :func:`block_sizes`
    at r, or :func:`block_plan` for a budget (granularity: one FFN channel in each pruned layer).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if (target_params is None) == (pruning_ratio is None):
        raise ValueError(f"give exactly one of target_params and pruning_ratio, got {target_params}, {pruning_ratio}")
    if pruning_ratio is not None and not 0 <= pruning_ratio < 1:
        raise ValueError(f"pruning_ratio must be in [0, 1), got {pruning_ratio}")
    if round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to}")
    if mode == "channel":
        d = model.config.hidden_size
        if pruning_ratio is not None:
            removed = d - int(d * (1 - pruning_ratio))
            d = max(1, d - (removed - removed % round_to))
        else:
            d = channel_plan(model, target_params, round_to)
        shapes = {
            "hidden_size": d,
            "intermediate_sizes": intermediate_sizes(model),
            "num_key_value_heads": kv_heads(model),
        }
        return {"mode": mode, **shapes, "params": channel_param_count(model, d)}
    layers = pruned_layer_range(len(decoder_layers(model)), keep_first, keep_last)
    if pruning_ratio is not None:
        ffn, kv, ratio = *block_sizes(model, pruning_ratio, layers, prune_attention), pruning_ratio
    else:
        ffn, kv, ratio = block_plan(model, target_params, layers, prune_attention)
    return {
        "mode": mode,
        "hidden_size": model.config.hidden_size,
        "intermediate_sizes": ffn,
        "num_key_value_heads": kv,
        "params": block_param_count(model, ffn, kv),
        "ratio": ratio,
        "pruned_layers": [layers.start, layers.stop],
    }


def prune_with_plan(
    model: PreTrainedModel,
    shapes: dict[str, Any],
    calib_batches: Iterable[torch.Tensor],
    num_calib_batches: int | None = None,
) -> PreTrainedModel:
    """Prune ``model`` in place to the shapes of :func:`plan`, choosing what to keep by Taylor importance."""
    if shapes["mode"] == "channel":
        prune_channel(model, shapes["hidden_size"], calib_batches, num_calib_batches)
    else:
        ffn, kv = shapes["intermediate_sizes"], shapes["num_key_value_heads"]
        prune_block(model, ffn, kv, calib_batches, num_calib_batches)
        model.config.llm_pruner.update(ratio=shapes["ratio"], pruned_layers=shapes["pruned_layers"])
    return model


def prune_to_target(
    model: PreTrainedModel,
    target_activated_params: float,
    mode: str,
    calib_batches: Iterable[torch.Tensor],
    *,
    num_calib_batches: int | None = None,
    **plan_options: Any,
) -> PreTrainedModel:
    """Prune ``model`` (in place) with LLM-Pruner to about ``target_activated_params`` parameters.

    plan_options: keep_first, keep_last, prune_attention (block), round_to (channel); see :func:`plan`.
    """
    shapes = plan(model, mode, target_params=target_activated_params, **plan_options)
    prune_with_plan(model, shapes, calib_batches, num_calib_batches)
    model.config.llm_pruner["target_params"] = float(target_activated_params)
    return model


# ---------------------------------------------------------------------------------------------- save / load


def save_llm_pruner(model: PreTrainedModel, directory: str | Path, tokenizer: Any = None) -> Path:
    """HF save (see :func:`dsmoe.saving.save_hf`) with HF remote code that rebuilds the per-layer shapes of
    config.llm_pruner, so that ``from_pretrained(dir, trust_remote_code=True)`` opens the pruned model."""
    if not hasattr(model.config, "llm_pruner"):
        raise ValueError("save_llm_pruner expects a model pruned by dsmoe.baselines.llm_pruner (no config.llm_pruner)")
    hidden = model.config.hidden_size
    if model.config.llm_pruner["mode"] == "channel":  # HF validates d % heads on save: config.json keeps the
        # dense-shaped d, config.llm_pruner["hidden_size"] the pruned one (shrink_to_spec shrinks to it)
        model.config.hidden_size = model.config.num_attention_heads * model.config.head_dim
    try:
        return save_hf(model, directory, tokenizer, remote_model_type="dsmoe_llm_pruner")
    finally:
        model.config.hidden_size = hidden


def load_llm_pruner(directory: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Rebuild a pruned model (saved by :func:`save_llm_pruner`, with or without remote code): build from
    config.json, shrink each layer to config.llm_pruner, load the weights."""
    from transformers.initialization import no_init_weights

    directory = Path(directory)
    config = base_config(directory)  # channel mode: built at the dense width, then shrunk
    spec = getattr(config, "llm_pruner", None)
    if spec is None:
        raise ValueError(f"{directory} holds no LLM-Pruner model (no 'llm_pruner' entry in config.json)")
    saved = getattr(config, "dtype", None) or torch.float32
    dtype = dtype or (getattr(torch, saved) if isinstance(saved, str) else saved)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped under no_init_weights; a no-op unless config.tie_word_embeddings
    shrink_to_spec(model, spec)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    # assign: the parameters become the file's memory-mapped tensors (as from_pretrained does), not copies, so
    # processes that load the same directory share its pages instead of each holding the weights privately
    state = {k: v.to(dtype) for k, v in read_tensors(directory).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - ({"lm_head.weight"} if tied else set()):
        raise ValueError(
            f"weights in {directory} do not match config.llm_pruner: missing {missing}, unexpected {unexpected}"
        )
    if tied:
        model.tie_weights()  # assign replaced the embedding; lm_head must follow it again
    return model.eval()


# ---------------------------------------------------------------------------------------------- methods

_TARGETS = ("target_fraction", "target_params", "pruning_ratio")
_COMMON = {*_TARGETS, "num_calib_batches", "calibration_samples", "calibration_seq_len"}
_ALLOWED = {
    "channel": _COMMON | {"round_to", "untie_lm_head"},
    "block": _COMMON | {"keep_first", "keep_last", "prune_attention"},
}


def _target(model: PreTrainedModel, options: dict[str, Any]) -> dict[str, float]:
    given = [k for k in _TARGETS if k in options]
    if len(given) != 1:
        raise ValueError(
            "give exactly one of target_fraction (of the dense params), target_params or pruning_ratio "
            f"(LLM-Pruner's own knob), got {sorted(options)}"
        )
    if "target_fraction" not in options:
        return {given[0]: float(options[given[0]])}
    fraction = float(options["target_fraction"])
    if not 0 < fraction <= 1:
        raise ValueError(f"target_fraction must be in (0, 1], got {fraction}")
    return {"target_params": fraction * count_params(model)}


def _check_options(mode: str, options: dict[str, Any]) -> None:
    reject_unknown_keys(options, _ALLOWED[mode], "option(s)", f" for llm_pruner_{mode}")


def untie_lm_head(model: PreTrainedModel) -> PreTrainedModel:
    """Give lm_head its own copy of a tied embedding, as the original LLM-Pruner does before channel pruning (its
    889M for Llama-3.2-1B, Table 1, counts both: 1215 × (603,425 + 128,256)); a no-op for untied models.

    The width is chosen before untying (:func:`options_plan`): Table 1's d' = 1215 is the width whose count, the
    embedding counted once, is DSMoE's 735M (733.2M); matched on the untied count, d' would be 1001."""
    embedding = model.get_input_embeddings().weight
    if model.lm_head.weight is embedding:
        model.lm_head.weight = nn.Parameter(embedding.detach().clone())
        model.config.tie_word_embeddings = False
    return model


def options_plan(model: PreTrainedModel, mode: str, options: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """The target (as :func:`plan` takes it) and the planned shapes for the options of method llm_pruner_<mode>
    (one of target_fraction, target_params, pruning_ratio, plus the mode's plan options); no data, works on meta.
    Planned on ``model`` as given: with ``untie_lm_head`` (channel), on the tied model, before untying it."""
    _check_options(mode, options)
    target = _target(model, options)
    rest = {k: v for k, v in options.items() if k not in _COMMON and k != "untie_lm_head"}
    return target, plan(model, mode, **target, **rest)


def calibration_sample(batches: Iterable[torch.Tensor], samples: int | None, seq_len: int | None) -> list[torch.Tensor]:
    """The first ``samples`` sequences of the calibration batches, each cut to ``seq_len`` tokens, as one batch
    (LLM-Pruner's own setting: 10 samples of 64 tokens); the batches unchanged when both are None."""
    batches = list(batches)
    if samples is None and seq_len is None:
        return batches
    rows = torch.cat([b[:, :seq_len] if seq_len else b for b in batches])
    for name, value in (("calibration_samples", samples), ("calibration_seq_len", seq_len)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or null, got {value!r}")
    if samples is not None and samples > len(rows):
        raise ValueError(f"calibration_samples={samples} but the calibration batches hold {len(rows)} sequences")
    return [rows[:samples]]


def _apply_for(
    mode: str,
) -> Callable[[PreTrainedModel, dict[str, Any], Iterable[torch.Tensor] | None], PreTrainedModel]:
    def apply(model: PreTrainedModel, options: dict[str, Any], calib: Iterable[torch.Tensor] | None) -> PreTrainedModel:
        _check_options(mode, options)
        if calib is None:
            raise ValueError(f"llm_pruner_{mode} needs calibration batches (input_ids) for its Taylor importance")
        target, shapes = options_plan(model, mode, options)
        if options.get("untie_lm_head"):
            untie_lm_head(model)
        calib = calibration_sample(calib, options.get("calibration_samples"), options.get("calibration_seq_len"))
        prune_with_plan(model, shapes, calib, options.get("num_calib_batches"))
        model.config.llm_pruner.update(target)
        return model

    return apply


_PLAN_KEYS = ("keep_first", "keep_last", "prune_attention", "round_to")


def match_llm_pruner(model: nn.Module, target: float, mode: str, **plan_options: Any) -> Match:
    """LLM-Pruner's pruned size for the target, from its own planner (channel: closed form over d';
    block: bisection over the layer ratio); granularity is one hidden channel or one FFN channel."""
    goal = resolve_target(model, target)
    shapes = plan(model, mode, target_params=goal, **plan_options)
    match = Match(f"llm_pruner_{mode}", {"target_params": goal, **plan_options}, goal, float(shapes["params"]))
    refuse_far_miss(match, f"One {mode} channel is too coarse for this model: change the target.")
    if not match.within_tolerance:
        note = f"one {mode} channel is too coarse here: nearest misses by {100 * match.rel_error:+.2f}%"
        match = Match(match.method, match.options, goal, match.achieved, note=note)
    return match


def describe(model: nn.Module) -> str:
    """Table 1's Configuration: the pruned hidden size d and the mean FFN width D over layers."""
    widths = ffn_widths(model)
    return f"d={model.config.llm_pruner['hidden_size']}, D={sum(widths) / len(widths):g}"


def _method(mode: str) -> Method:
    def structure(dense: PreTrainedModel, options: dict[str, Any]) -> tuple[int, str]:
        _, shapes = options_plan(dense, mode, options)
        params = shapes["params"]
        if options.get("untie_lm_head"):
            params = channel_param_count(untie_lm_head(dense), shapes["hidden_size"])
        setting = (
            f"d={shapes['hidden_size']}"
            if mode == "channel"
            else f"r={shapes['ratio']:.3f} in layers {shapes['pruned_layers'][0]}..{shapes['pruned_layers'][1] - 1}"
        )
        return params, setting

    def match(model: nn.Module, target: float, options: dict[str, Any]) -> Match:
        return match_llm_pruner(model, target, mode, **{k: v for k, v in options.items() if k in _PLAN_KEYS})

    return Method(
        f"llm_pruner_{mode}",
        _apply_for(mode),
        no_aux_losses,
        all_params,
        save_llm_pruner,
        load_llm_pruner,
        recognises=lambda config: config.get("llm_pruner", {}).get("mode") == mode,
        describe=describe,
        match=match,
        structure=structure,
        needs_calibration=True,
        check_options=lambda options, matched: _check_options(mode, options),
    )


LLM_PRUNER_CHANNEL = _method("channel")
LLM_PRUNER_BLOCK = _method("block")
