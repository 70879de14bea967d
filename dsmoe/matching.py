"""Match each baseline's setting to a target activated-parameter count (paper §5: "configured to match
DSMoE's activated parameter count"; Table 1 counts 735M of 1.24B for LLaMA-1B).

A target is absolute (> 1) or a fraction (≤ 1) of the dense model's total parameters. Each method's ``match``
hook (:class:`dsmoe.method.Method`) derives its own knob from the dense model and returns a :class:`Match` with
the achieved count and the relative mismatch; ``within_tolerance`` is |mismatch| ≤ 1% unless the method's granularity
makes that impossible, in which case ``note`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

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
