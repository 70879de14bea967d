"""A SwiGLU FFN cut into n experts along its intermediate dimension, with DSMoE's and LLaMA-MoE's gates.

Expert i owns intermediate channels [i·m, (i+1)·m), m = D/n, of gate_proj (W), up_proj (U) and down_proj (V),
so the three pre-trained matrices are kept as they are (paper eq. 6) and a layer's state dict is the dense one
plus its gate. This file is HF remote code: it is copied into every saved DSMoE / LLaMA-MoE directory and
imports only torch and transformers. The library's layers (dsmoe.layer.DSMoEMLP,
dsmoe.baselines.llama_moe.LlamaMoEMLP) subclass these and add fast inference paths and statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("dsmoe", "no_ste", "no_gate")
GATE_NETWORKS = ("linear", "mlp")


def expert_size(intermediate_size: int, num_experts: int) -> int:
    """m = D/n, the channels of each expert when a SwiGLU FFN of width D is cut into n (eq. 6)."""
    if intermediate_size % num_experts:
        raise ValueError(
            f"intermediate size D={intermediate_size} is not divisible by num_experts={num_experts}; "
            f"choose n among the divisors of {intermediate_size}"
        )
    return intermediate_size // num_experts


def is_swiglu(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) and (
        hasattr(module, "act_fn")
    )


MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def already_moe(config: Any) -> str | None:
    """``"key=value"`` where a model's config says it is a mixture of experts already (Mixtral, Qwen2-MoE,
    DeepSeek-MoE, ...), else None: its routed experts are not one dense FFN to cut."""
    for key in MOE_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return f"{key}={value}"
    return None


def replace_swiglu(model: nn.Module, factory: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every SwiGLU FFN of ``model`` by ``factory(ffn)`` (in the FFN's train/eval mode); returns the count.
    A model that is a mixture of experts already is refused (only its shared expert would be replaced)."""
    config = getattr(model, "config", None)
    moe = already_moe(config)
    if moe is not None:
        raise ValueError(
            f"a {getattr(config, 'model_type', type(model).__name__)!r} model is a mixture of experts already "
            f"(config.{moe}); DSMoE and LLaMA-MoE cut the dense SwiGLU FFN of Llama-family models (Llama, Qwen2, "
            "Mistral, ...)"
        )
    targets = [(name, m) for name, m in model.named_modules() if is_swiglu(m)]
    if not targets:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"no SwiGLU FFN (a module with gate_proj, up_proj, down_proj and act_fn) found in a {kind!r} model; "
            "supported: Llama-family gated FFNs (Llama, Qwen2, Mistral, ...)"
        )
    for name, ffn in targets:
        new = factory(ffn)
        new.train(ffn.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return len(targets)


class SwiGLUParts(NamedTuple):
    """The modules of a SwiGLU FFN act(x·W) ⊙ (x·U) · V; a partitioned layer keeps them as they are."""

    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    act_fn: nn.Module


def swiglu_parts(ffn: nn.Module) -> SwiGLUParts:
    return SwiGLUParts(ffn.gate_proj, ffn.up_proj, ffn.down_proj, ffn.act_fn)


class PartitionedSwiGLU(nn.Module):
    """h = Σ_i w_i·o_i, o_i = (act(x·W_i) ⊙ x·U_i)·V_i, for per-token expert weights w [tokens, n] (eq. 6)."""

    def __init__(self, ffn: SwiGLUParts, num_experts: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = ffn
        self.num_experts = num_experts
        self.expert_size = expert_size(ffn.gate_proj.out_features, num_experts)

    def _gate_linear(self, outputs: int, inputs: int | None = None) -> nn.Linear:
        """A bias-free Linear (d or ``inputs`` → ``outputs``) on the device and dtype of the FFN weights."""
        w = self.gate_proj.weight
        linear = nn.Linear(inputs or w.shape[1], outputs, bias=False)
        return linear.to(device=w.device, dtype=w.dtype)

    def masked_forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Dense reference: every expert computed, expert i's channels scaled by weights[:, i]."""
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        h = h.view(-1, self.num_experts, self.expert_size) * weights.to(h.dtype).unsqueeze(-1)
        return self.down_proj(h.view(x.shape[0], -1))

    def ffn_params(self) -> int:
        return sum(p.numel() for m in (self.gate_proj, self.up_proj, self.down_proj) for p in m.parameters())


class ThresholdGatedSwiGLU(PartitionedSwiGLU):
    """DSMoE: h = n/#active · Σ_i o_i·G(σ(x·Y_i)), G(g) = g if g > τ else 0 (eqs. 6–8).

    Training weights per variant: "dsmoe" uses S(g) = sg(G(g)) + g − sg(g) (eqs. 10–11), "no_ste" uses
    G(g) (eq. 7), "no_gate" uses σ(xY) with no threshold and no rescale (eq. 20). In eval mode every variant
    applies G and eq. 8 with the current τ; a token with no active expert outputs 0. The router is the
    paper's Y, stored transposed as an nn.Linear (``router.weight``).
    """

    def __init__(self, ffn: SwiGLUParts, num_experts: int, tau: float, variant: str = "dsmoe") -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        super().__init__(ffn, num_experts)
        self.tau = float(tau)
        self.variant = variant
        self.rescale = True  # eq. 8's n/#active; an evaluation knob (Fig. 2's no-G(x) model trained without it)
        self.router = self._gate_linear(num_experts)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """g = σ(x·Y), computed in at least fp32 (eq. 7)."""
        logits = self.router(x)
        return torch.sigmoid(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits)

    def expert_weights(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert output weights and the activity mask for gates g [..., n] (eqs. 7, 8, 10, 11, 20).

        A token with no active expert (k = 0, which the paper leaves undefined) outputs 0; its scale is taken as
        n/max(k, 1) = n, so under S(x) each of its gates still learns, with slope n·o_i where an active token's gates
        have n/k·o_i (eq. 16 times eq. 8's factor)."""
        active = g > self.tau
        if self.training and self.variant == "no_gate":
            return g, active
        gated = g * active  # G(g)
        if self.training and self.variant == "dsmoe":
            gated = gated.detach() + g - g.detach()  # S(g)
        if not self.rescale:
            return gated, active
        count = active.sum(-1, keepdim=True)
        scale = self.num_experts / count.clamp(min=1).to(g.dtype)
        return gated * scale, active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        weights, _ = self.expert_weights(self.gates(x2))
        out = self.masked_forward(x2, weights)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, expert_size={self.expert_size}, tau={self.tau}, variant={self.variant!r}"
        )


def topk_scale(num_experts: int, top_k: int, score_scale_factor: float | None) -> float:
    """LLaMA-MoE's score_scale_factor; None means n/k, the value of its released configurations."""
    return num_experts / top_k if score_scale_factor is None else float(score_scale_factor)


def smooth_load(
    clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, top_values: torch.Tensor, k: int
) -> torch.Tensor:
    """Load_i = Σ_x P(x, i), P(x, i) = Φ((clean_i − kth_excluding(noisy, k, i)) / std_i) (Shazeer et al., eqs. 8–10).

    ``top_values`` are the k+1 largest noisy logits per token. kth_excluding is the (k+1)-th largest
    for an expert now in the top k and the k-th largest otherwise. (LLaMA-MoE's code decides "in the
    top k" from the noise term alone; this follows the paper's definition.)
    """
    threshold_in, threshold_out = top_values[:, k : k + 1], top_values[:, k - 1 : k]
    is_in = noisy > threshold_in
    p_in = torch.special.ndtr((clean - threshold_in) / noise_std)
    p_out = torch.special.ndtr((clean - threshold_out) / noise_std)
    return torch.where(is_in, p_in, p_out).sum(0)


class TopKGatedSwiGLU(PartitionedSwiGLU):
    """LLaMA-MoE: y = s · Σ_{i ∈ topk(H(x))} softmax(H(x)_topk)_i · o_i, exactly k experts per token.

    H(x) = x·W_g, plus ε ⊙ (softplus(x·W_noise) + noise_epsilon), ε ~ N(0, 1), in training with noisy
    gating (Shazeer et al. 2017). The gate ``router`` is x·W_g (zero-initialised) or, for gate_network
    "mlp", Linear(d, n) → tanh → Linear(n, n); ``noise`` is W_noise (zero-initialised; absent without noise).
    """

    def __init__(
        self,
        ffn: SwiGLUParts,
        num_experts: int,
        top_k: int,
        score_scale_factor: float | None = None,
        noisy_gating: bool = True,
        noise_epsilon: float = 1e-2,
        gate_network: str = "linear",
    ) -> None:
        if gate_network not in GATE_NETWORKS:
            raise ValueError(f"gate_network must be one of {GATE_NETWORKS}, got {gate_network!r}")
        super().__init__(ffn, num_experts)
        self.top_k = top_k
        self.scale = topk_scale(num_experts, top_k, score_scale_factor)
        self.noisy_gating, self.noise_epsilon = noisy_gating, float(noise_epsilon)
        if gate_network == "linear":
            self.router = self._gate_linear(num_experts)
            nn.init.zeros_(self.router.weight)  # LLaMA-MoE's linear gate starts at zero
        else:
            hidden = self._gate_linear(num_experts)
            self.router = nn.Sequential(hidden, nn.Tanh(), self._gate_linear(num_experts, num_experts))
        self.noise: nn.Linear | None = None
        if noisy_gating:
            self.noise = self._gate_linear(num_experts)
            nn.init.zeros_(self.noise.weight)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k expert indices [T, k], their softmax scores [T, k], Importance [n] and Load [n]."""
        clean = self.router(x).float()
        noisy_training = self.training and self.noisy_gating
        if noisy_training:
            noise_std = F.softplus(self.noise(x).float()) + self.noise_epsilon
            logits = clean + torch.randn_like(clean) * noise_std
        else:
            logits = clean
        k, n = self.top_k, self.num_experts
        top_values, top_indices = logits.topk(min(k + 1, n), dim=-1)
        indices, scores = top_indices[:, :k], top_values[:, :k].softmax(-1)
        importance = torch.zeros_like(logits).scatter(1, indices, scores).sum(0)
        if noisy_training and k < n:
            load = smooth_load(clean, logits, noise_std, top_values, k)
        else:  # not differentiable: LLaMA-MoE's fallback without noise (tokens per expert; bincount syncs on CUDA)
            load = torch.zeros_like(importance).index_add_(0, indices.flatten(), torch.ones_like(scores).flatten())
        return indices, scores, importance, load

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        indices, scores, _, _ = self.route(x2)
        weights = scores.new_zeros(x2.shape[0], self.num_experts).scatter(1, indices, scores * self.scale)
        out = self.masked_forward(x2, weights)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, expert_size={self.expert_size}, scale={self.scale}"
