"""Match each baseline's setting to a target activated-parameter count (paper §5: "configured to match
DSMoE's activated parameter count"; Table 1 counts 735M of 1.24B for LLaMA-1B).

A target is absolute (> 1) or a fraction (≤ 1) of the dense model's total parameters. Each function
derives the method's own knob from the dense model and returns a :class:`Match` with the achieved count
and the relative mismatch; ``within_tolerance`` is |mismatch| ≤ 1% unless the method's granularity
makes that impossible, in which case ``note`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dsmoe.baselines.sparsegpt import decoder_layers, pruned_count_for
from dsmoe.baselines.topk_moe import TopKMoEConfig, predicted_activated_params
from dsmoe.stats import count_params

TOLERANCE = 0.01


@dataclass(frozen=True)
class Match:
    """options: the method options to pass to Method.apply; achieved/target in parameters per token."""

    method: str
    options: dict[str, Any]
    target: float
    achieved: float
    note: str = ""
    candidates: dict[Any, float] = field(default_factory=dict)  # setting → achieved, for discrete knobs

    @property
    def rel_error(self) -> float:
        return (self.achieved - self.target) / self.target

    @property
    def within_tolerance(self) -> bool:
        return abs(self.rel_error) <= TOLERANCE


def resolve_target(model: nn.Module, target: float) -> float:
    """A fraction in (0, 1] of the dense model's parameters, or an absolute count (> 1) below the total."""
    total = count_params(model)
    if target <= 0:
        raise ValueError(f"target activated params must be > 0, got {target!r}")
    absolute = target * total if target <= 1 else float(target)
    if absolute > total:
        raise ValueError(f"target {absolute:.0f} exceeds the dense model's {total} parameters")
    return absolute


def match_sparsegpt(model: nn.Module, target: float, blocksize: int = 128) -> Match:
    """SparseGPT's sparsity s over the decoder Linears so that total − pruned ≈ target (exact up to rounding)."""
    goal = resolve_target(model, target)
    total = count_params(model)
    shapes = [tuple(m.weight.shape) for m in decoder_layers(model).modules() if isinstance(m, nn.Linear)]
    prunable = sum(r * c for r, c in shapes)
    sparsity = (total - goal) / prunable
    if not 0 <= sparsity < 1:
        raise ValueError(
            f"target {goal:.0f} needs pruning {total - goal:.0f} weights but the decoder Linears hold {prunable}; "
            f"SparseGPT can reach activated params in ({total - prunable}, {total}]"
        )
    achieved = total - sum(pruned_count_for(s, sparsity, blocksize) for s in shapes)
    return Match("sparsegpt", {"sparsity": sparsity, "blocksize": blocksize}, goal, float(achieved))


def match_topk_moe(model: nn.Module, target: float, num_experts: int = 8, gate_network: str = "linear") -> Match:
    """The k of n experts whose activated params lie nearest the target (k is discrete: mismatch reported)."""
    goal = resolve_target(model, target)
    candidates = {
        k: predicted_activated_params(model, TopKMoEConfig(num_experts=num_experts, top_k=k, gate_network=gate_network))
        for k in range(1, num_experts + 1)
    }
    k = min(candidates, key=lambda c: abs(candidates[c] - goal))
    match = Match("llama_moe", {"num_experts": num_experts, "top_k": k}, goal, candidates[k], candidates=candidates)
    if not match.within_tolerance:
        step = candidates[2] - candidates[1] if num_experts > 1 else float("nan")
        match = Match(
            match.method,
            match.options,
            goal,
            match.achieved,
            note=f"k is discrete: each expert per token adds {step:.0f} params; nearest k={k} misses the target by "
            f"{100 * match.rel_error:+.2f}%",
            candidates=candidates,
        )
    return match


def match_llm_pruner(model: nn.Module, target: float, mode: str, **plan_options: Any) -> Match:
    """LLM-Pruner's pruned size for the target, from its own planner (channel: closed form over d';
    block: bisection over the layer ratio); granularity is one hidden channel or one FFN channel."""
    from dsmoe.baselines.llm_pruner import plan

    goal = resolve_target(model, target)
    shapes = plan(model, mode, target_params=goal, **plan_options)
    match = Match(f"llm_pruner_{mode}", {"target_params": goal, **plan_options}, goal, float(shapes["params"]))
    if not match.within_tolerance:
        note = f"one {mode} channel is too coarse here: nearest misses by {100 * match.rel_error:+.2f}%"
        match = Match(match.method, match.options, goal, match.achieved, note=note)
    return match


def match_options(method: str, model: nn.Module, target: float, options: dict[str, Any] | None = None) -> Match:
    """The options that make ``method`` activate ``target`` params per token on the dense ``model``."""
    options = dict(options or {})
    if method == "sparsegpt":
        return match_sparsegpt(model, target, options.get("blocksize", 128))
    if method == "llama_moe":
        return match_topk_moe(model, target, options.get("num_experts", 8), options.get("gate_network", "linear"))
    if method in ("llm_pruner_channel", "llm_pruner_block"):
        plan_keys = ("keep_first", "keep_last", "prune_attention", "round_to")
        return match_llm_pruner(
            model, target, method.removeprefix("llm_pruner_"), **{k: v for k, v in options.items() if k in plan_keys}
        )
    raise ValueError(
        f"method {method!r} cannot be matched to a target: choose sparsegpt, llama_moe, llm_pruner_channel or "
        "llm_pruner_block (DSMoE's activation is learned, not set)"
    )
