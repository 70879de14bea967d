"""Match each baseline's setting to a target activated-parameter count (paper §5: "configured to match
DSMoE's activated parameter count"; Table 1 counts 735M of 1.24B for LLaMA-1B).

A target is a fraction in (0, 1] of the dense model's total parameters or an absolute count: a whole number of at
least ``MIN_COUNT`` (a float such as 2.0 or 1.5 is refused rather than read as 2 parameters or as 200%). Each
method's ``match`` hook (:class:`dsmoe.method.Method`) derives its own knob from the dense model and returns a
:class:`Match` with the achieved count and the relative mismatch; ``within_tolerance`` is |mismatch| ≤ 1% unless the
method's granularity makes that impossible, in which case ``note`` says so. A method whose nearest setting misses
by more than ``MAX_MISS`` refuses the target (:func:`refuse_far_miss`) instead of training a model of another size:
10% is above half of LLaMA-MoE's step in k with the paper's 8 experts (its nearest k misses the paper's 1B and 7B
targets by -0.3% and +2.65%, and any target between k=1 and k=8 of those models by under 9%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dsmoe.stats import count_params

TOLERANCE = 0.01
MAX_MISS = 0.10  # a nearest setting missing the target by more than this is refused
MIN_COUNT = 1000  # the smallest absolute target: fewer parameters is no model's activated size
KEY = "method_options.match_activated"
TARGET_FORMS = f"a fraction in (0, 1] of the dense params or a whole parameter count >= {MIN_COUNT}"


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


def check_target(target: float, name: str = "target activated params") -> float:
    """``target`` if it is a fraction in (0, 1] or a whole count >= MIN_COUNT; else a ValueError naming ``name``."""
    if not math.isfinite(target) or target <= 0:
        raise ValueError(f"{name} must be > 0: {TARGET_FORMS}; got {target!r}")
    if target > 1 and target != int(target):
        raise ValueError(
            f"{name}={target!r} is neither a fraction in (0, 1] nor a whole parameter count: {TARGET_FORMS}"
        )
    if 1 < target < MIN_COUNT:
        raise ValueError(
            f"{name}={target!r} is below {MIN_COUNT}: as a count, {target:.0f} parameters is reached by no "
            f"configuration, and it is no fraction ({target:.0%} of the dense params would exceed them): {TARGET_FORMS}"
        )
    return target


def parse_target(value: Any, dsmoe_fraction: float | None = None) -> float | None:
    """``method_options.match_activated`` as a number for :func:`resolve_target` (None stays None): "dsmoe" is
    ``dsmoe_fraction`` (DSMoE's measured fraction, known to the experiment driver), numbers are checked by
    :func:`check_target`. Anything else is a ValueError naming the key and the allowed forms."""
    if value is None:
        return None
    if value == "dsmoe":
        if dsmoe_fraction is None:
            raise ValueError(
                f"{KEY}='dsmoe' is resolved by the experiment driver (dsmoe.experiment) to DSMoE's measured "
                f"activated fraction; a run trained on its own needs {TARGET_FORMS}"
            )
        value = dsmoe_fraction
    allowed = f"{KEY} must be 'dsmoe' (DSMoE's measured fraction), {TARGET_FORMS}; got {value!r}"
    if isinstance(value, bool):
        raise ValueError(allowed)
    try:
        target = float(value)
    except (TypeError, ValueError):
        raise ValueError(allowed) from None
    return check_target(target, KEY)


def refuse_far_miss(match: Match, choices: str) -> Match:
    """``match``, unless its nearest setting misses the target by more than MAX_MISS: then a ValueError naming the
    target, the nearest achievable count with its options, and ``choices`` (what the method can reach)."""
    if abs(match.rel_error) <= MAX_MISS:
        return match
    raise ValueError(
        f"{match.method} cannot match target {match.target:.0f} activated params within {MAX_MISS:.0%}: the nearest, "
        f"{match.options}, gives {match.achieved:.0f} ({100 * match.rel_error:+.2f}%). {choices}"
    )


def resolve_target(model: nn.Module, target: float) -> float:
    """A fraction in (0, 1] of the dense model's parameters, or a whole count (>= MIN_COUNT) up to the total."""
    total = count_params(model)
    check_target(target)
    absolute = target * total if target <= 1 else float(target)
    if absolute > total:
        raise ValueError(f"target {absolute:.0f} exceeds the dense model's {total} parameters")
    return absolute
