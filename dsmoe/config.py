"""DSMoE hyper-parameters (paper §4, §5.2)."""

from __future__ import annotations

from dataclasses import dataclass

from dsmoe.config_checks import StoredConfig
from dsmoe.hf_remote.partitioned_swiglu import VARIANTS


@dataclass
class DSMoEConfig(StoredConfig):
    """How a dense SwiGLU FFN is turned into a DSMoE layer.

    num_experts: n, the number of equal slices of the intermediate dimension (eq. 6).
    tau: the gate threshold τ of G(x) (eq. 7); adjustable after training.
    variant: "dsmoe" trains with the straight-through estimator S(x) (eq. 11);
        "no_ste" trains with G(x) itself (eq. 7, Table 3 ablation);
        "no_gate" trains with the soft σ(xY) weights and no threshold (eq. 20, Fig. 2 ablation).
        At evaluation every variant applies G and the n/#active rescale (eq. 8).
    sparsity_weight: weight of the L1 sparsity loss in L = L_LM + w·L_sparse (eq. 17/19).
    router_init_std: std of the random normal router init; None uses the model's initializer_range.
    """

    num_experts: int = 8
    tau: float = 0.5
    variant: str = "dsmoe"
    sparsity_weight: float = 1.0
    router_init_std: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {self.num_experts!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not (_is_number(self.tau) and 0 <= self.tau < 1):
            raise ValueError(f"tau must lie in [0, 1) since gates are sigmoids, got {self.tau!r}")
        if not (_is_number(self.sparsity_weight) and self.sparsity_weight >= 0):
            raise ValueError(f"sparsity_weight must be a number >= 0, got {self.sparsity_weight!r}")
        if self.router_init_std is not None and not (_is_number(self.router_init_std) and self.router_init_std > 0):
            raise ValueError(
                f"router_init_std must be a number > 0 or None (the model's initializer_range), got {self.router_init_std!r}"
            )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
