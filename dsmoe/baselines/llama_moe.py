"""LLaMA-MoE baseline (Zhu et al., 2024): the dense SwiGLU FFN split into n experts with a noisy top-k gate.

Expert i owns intermediate channels [i·m, (i+1)·m), m = D/n, of gate_proj, up_proj and down_proj — the
same partition as DSMoE (paper eq. 5) and LLaMA-MoE's "Independent" construction with contiguous
indices — so the layer keeps the three dense matrices and only adds the gate. Following LLaMA-MoE's
``TopKBalancedNoisyGate`` and ``UniversalCalculator`` (pjlab-sys4nlp/llama-moe, smoe/modules/moe):

    H(x) = x·W_g + ε ⊙ (softplus(x·W_noise) + noise_epsilon),  ε ~ N(0, 1)   (noise in training only)
    G(x) = softmax over the top-k entries of H(x), 0 elsewhere
    y    = score_scale_factor · Σ_{i ∈ topk} G(x)_i · E_i(x)

Exactly k experts per token; on the CPU only they are computed, on accelerators all of them with zero weight where
not selected (no host sync; the same output and gradients). The balance loss is
Shazeer et al. (2017)'s w·(cv²(Importance) + cv²(Load)), summed over layers as LLaMA-MoE does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

import dsmoe.fast as fast
from dsmoe.config_checks import StoredConfig, options_check
from dsmoe.hf_remote.partitioned_swiglu import (
    GATE_NETWORKS,
    SwiGLUParts,
    TopKGatedSwiGLU,
    is_swiglu,
    replace_swiglu,
    swiglu_parts,
    topk_scale,
)
from dsmoe.matching import Match, refuse_far_miss, resolve_target
from dsmoe.method import Batches, Method, ffn_widths
from dsmoe.saving import load_with_extra_params, save_hf, saved_entry
from dsmoe.stats import count_params


@dataclass
class LlamaMoEConfig(StoredConfig):
    """How a dense SwiGLU FFN becomes a LLaMA-MoE layer.

    num_experts: n equal slices of the intermediate dimension. top_k: k experts per token (paper: 3 of 8).
    balance_weight: w of the balance loss (LLaMA-MoE's gate_balance_loss_weight, 1e-2).
    noisy_gating: add the learned Gaussian noise to the gate logits in training (Shazeer et al., eq. 4).
    noise_epsilon: floor of the noise std (LLaMA-MoE: 1e-2).
    score_scale_factor: constant multiplying the weighted expert outputs; None means n/k, the value of
        LLaMA-MoE's released configurations (e.g. 4.0 for 4 of 16 experts).
    gate_network: "linear" x·W_g, zero-initialised (the LLaMA-MoE paper's gate); "mlp"
        Linear(d, n) → tanh → Linear(n, n) (the default of LLaMA-MoE's code and released models).
    """

    num_experts: int = 8
    top_k: int = 3
    balance_weight: float = 1e-2
    noisy_gating: bool = True
    noise_epsilon: float = 1e-2
    score_scale_factor: float | None = None
    gate_network: str = "linear"

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}; choose 1 <= k <= n")
        if float(self.balance_weight) < 0:
            raise ValueError(f"balance_weight must be >= 0, got {self.balance_weight!r}")
        if float(self.noise_epsilon) < 0:
            raise ValueError(f"noise_epsilon must be >= 0, got {self.noise_epsilon!r}")
        if self.score_scale_factor is not None and float(self.score_scale_factor) <= 0:
            raise ValueError(f"score_scale_factor must be > 0 or None (meaning n/k), got {self.score_scale_factor!r}")
        if self.gate_network not in GATE_NETWORKS:
            raise ValueError(f"gate_network must be one of {GATE_NETWORKS}, got {self.gate_network!r}")

    @property
    def scale(self) -> float:
        return topk_scale(self.num_experts, self.top_k, self.score_scale_factor)


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation var(x)/mean(x)² (unbiased var, as LLaMA-MoE); 0 for one expert."""
    if x.numel() == 1:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + eps)


class LlamaMoEMLP(TopKGatedSwiGLU):
    """y = s · Σ_{i ∈ topk(H(x))} softmax(H(x)_topk)_i · (act(x·W_i) ⊙ x·U_i)·V_i, exactly k experts per token.

    The gate and routing are :class:`TopKGatedSwiGLU`'s (the HF remote code of saved models); this class
    computes only the selected experts and keeps the balance loss of the last forward.
    """

    def __init__(self, ffn: SwiGLUParts, config: LlamaMoEConfig) -> None:
        super().__init__(
            ffn,
            config.num_experts,
            config.top_k,
            config.score_scale_factor,
            config.noisy_gating,
            config.noise_epsilon,
            config.gate_network,
        )
        self.fast_cache: fast.ExpertBlocks | None = None  # run views of the experts, see dsmoe.fast
        # "sparse": only the selected experts, grouped (tokens per expert read to the host: one sync per layer);
        # "masked": every expert, weighted 0 where not selected (no host sync); "auto": sparse on the CPU, masked on
        # accelerators, as DSMoE's layers do. The same output and gradients.
        self.impl = "auto"
        self.last_balance_loss: torch.Tensor | None = None  # unweighted cv²(I) + cv²(L), with its graph
        self.last_indices: torch.Tensor | None = None  # [tokens, k] experts of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        indices, scores, importance, load = self.route(x2)
        self.last_indices = indices
        self.last_balance_loss = cv_squared(importance) + cv_squared(load)
        out = self.experts_forward(x2, indices, scores * self.scale)
        return out.reshape(*shape[:-1], out.shape[-1])

    def experts_forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The selected experts' weighted sum: grouped by expert (one GEMM chain each) or masked, see ``impl``."""
        dense = torch.zeros(x.shape[0], self.num_experts, dtype=weights.dtype, device=weights.device)
        dense = dense.scatter(1, indices, weights)  # differentiable in weights
        if fast.chosen_path(self.impl, x) == "masked":
            return self.masked_forward(x, dense)
        active = torch.zeros_like(dense, dtype=torch.bool).scatter_(1, indices, True)
        return fast.sparse_forward(self, x, dense, active)


def llama_moe_layers(model: nn.Module) -> list[LlamaMoEMLP]:
    return [m for m in model.modules() if isinstance(m, LlamaMoEMLP)]


def convert_to_llama_moe(model: PreTrainedModel, config: LlamaMoEConfig) -> PreTrainedModel:
    """Replace every SwiGLU MLP by a LlamaMoEMLP sharing its weights; records ``model.config.llama_moe``."""
    if llama_moe_layers(model):
        raise ValueError("model is already converted to a top-k MoE")
    replace_swiglu(model, lambda mlp: LlamaMoEMLP(swiglu_parts(mlp), config))
    model.config.llama_moe = config.to_dict()
    return model


def llama_moe_config_of(model: nn.Module) -> LlamaMoEConfig:
    return LlamaMoEConfig.from_dict(dict(model.config.llama_moe))


def balance_loss(model: nn.Module) -> torch.Tensor:
    """w · Σ_layers (cv²(Importance) + cv²(Load)) of the last forward, as LLaMA-MoE adds it to the LM loss."""
    layers = llama_moe_layers(model)
    if not layers:
        raise ValueError("balance_loss needs a model converted with convert_to_llama_moe(); none found")
    if any(layer.last_balance_loss is None for layer in layers):
        raise RuntimeError("balance_loss needs a forward pass of the model first")
    weight = llama_moe_config_of(model).balance_weight
    return weight * torch.stack([layer.last_balance_loss for layer in layers]).sum()


def activated_params(model: nn.Module) -> float:
    """Params used per token at inference: everything but the noise network, FFNs counted at k/n."""
    layers = llama_moe_layers(model)
    if not layers:
        raise ValueError("activated_params needs a model converted with convert_to_llama_moe(); none found")
    inactive = sum(
        layer.ffn_params() * (1 - layer.top_k / layer.num_experts) + (layer.noise.weight.numel() if layer.noise else 0)
        for layer in layers
    )
    return float(count_params(model) - inactive)


def predicted_activated_params(model: nn.Module, config: LlamaMoEConfig) -> float:
    """activated_params() the dense ``model`` would have after convert_to_llama_moe(model, config)."""
    mlps = [m for m in model.modules() if is_swiglu(m)]
    if not mlps:
        raise ValueError("no SwiGLU FFN found in the model")
    n, k = config.num_experts, config.top_k
    router = n * n if config.gate_network == "mlp" else 0
    total = count_params(model)
    for mlp in mlps:
        ffn = sum(p.numel() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj) for p in m.parameters())
        total += mlp.gate_proj.in_features * n + router - ffn * (1 - k / n)
    return float(total)


def save_llama_moe(model: PreTrainedModel, directory: str | Path, tokenizer=None) -> Path:
    """HF format: the dense weights plus router/noise tensors; config.json carries the "llama_moe" entry, and
    HF remote code opens the directory as this model (``from_pretrained(dir, trust_remote_code=True)``)."""
    if not hasattr(model.config, "llama_moe"):
        raise ValueError("save_llama_moe() expects a model converted with convert_to_llama_moe()")
    return save_hf(model, directory, tokenizer, remote_model_type="dsmoe_llama_moe")


def _is_gate(name: str) -> bool:
    return ".mlp.router." in name or ".mlp.noise." in name


def load_llama_moe(
    directory: str | Path, dtype: torch.dtype | None = None, **from_pretrained_kwargs
) -> PreTrainedModel:
    """Load a model written by :func:`save_llama_moe`: dense weights via from_pretrained, then the gates."""
    config = LlamaMoEConfig.from_dict(dict(saved_entry(directory, "llama_moe")))
    return load_with_extra_params(
        directory, lambda m: convert_to_llama_moe(m, config), _is_gate, dtype, **from_pretrained_kwargs
    )


def _apply(model: PreTrainedModel, options: dict[str, Any], calib: Batches | None) -> PreTrainedModel:
    return convert_to_llama_moe(model, LlamaMoEConfig(**options))


def _aux(model: nn.Module) -> dict[str, torch.Tensor]:
    return {"balance": balance_loss(model)}


def match_llama_moe(model: nn.Module, target: float, num_experts: int = 8, gate_network: str = "linear") -> Match:
    """The k of n experts whose activated params lie nearest the target (k is discrete: mismatch reported, and a
    miss above MAX_MISS refused, naming what each k gives)."""
    goal = resolve_target(model, target)
    candidates = {
        k: predicted_activated_params(
            model, LlamaMoEConfig(num_experts=num_experts, top_k=k, gate_network=gate_network)
        )
        for k in range(1, num_experts + 1)
    }
    k = min(candidates, key=lambda c: abs(candidates[c] - goal))
    match = Match("llama_moe", {"num_experts": num_experts, "top_k": k}, goal, candidates[k], candidates=candidates)
    reachable = ", ".join(f"k={c}: {a:.0f}" for c, a in candidates.items())
    refuse_far_miss(
        match, f"With num_experts={num_experts} the top-k gives {reachable}: change the target or num_experts."
    )
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


def describe(model: nn.Module) -> str:
    """Table 1's Configuration: d, the expert width × n, and k."""
    config = llama_moe_config_of(model)
    n = config.num_experts
    return f"d={model.config.hidden_size}, D={ffn_widths(model)[0] // n}x{n}, topK={config.top_k}"


LLAMA_MOE = Method(
    "llama_moe",
    _apply,
    _aux,
    activated_params,
    save_llama_moe,
    load_llama_moe,
    recognises=lambda config: "llama_moe" in config,
    describe=describe,
    match=lambda model, target, options: match_llama_moe(
        model, target, options.get("num_experts", LlamaMoEConfig.num_experts), options.get("gate_network", "linear")
    ),
    check_options=options_check(LlamaMoEConfig, "llama_moe"),
    experts=lambda options: options.get("num_experts", LlamaMoEConfig.num_experts),
)
