"""The runs behind each reproduction target (./reproduce.sh TARGET) and their labels in its table or figure.

A run is the name of a ``methods`` block of a scale (experiments/configs/scales/<scale>.yaml), or "dense": the
untrained dense model, which needs no training. The experiment scripts and the disk plan (dsmoe.plan) both read
their run lists from here.
"""

from __future__ import annotations

from collections.abc import Iterable

DENSE = "dense"

# Table 1 (and Table 2, which evaluates the same models): rows in the paper's order. DSMoE trains first in practice:
# every baseline matches its measured activated fraction ("match_activated: dsmoe").
TABLE1_RUNS = (
    (DENSE, "dense (no training)"),
    ("llm_pruner_channel", "LLM-Pruner-channel"),
    ("llm_pruner_block", "LLM-Pruner-block"),
    ("sparsegpt", "SparseGPT"),
    ("llama_moe", "LLaMA-MoE"),
    ("dsmoe", "DSMoE"),
)
ABLATION_STE_RUNS = (("dsmoe", "DSMoE"), ("dsmoe_no_ste", "w/o S(x)"))  # Table 3
TAU_SWEEP_RUNS = (("dsmoe", "DSMoE at τ = 0.2 … 0.8"),)  # Table 4
TOKEN_CURVE_RUNS = (("dsmoe", "DSMoE by tokens seen"),)  # Tables 5/6: the same experiment at 1B and 7B
NO_GATE_RUNS = (("dsmoe_no_gate", "w/o G(x)"), ("dsmoe", "DSMoE"))  # Fig. 2
HEATMAP_RUNS = (("dsmoe", "DSMoE"),)  # Fig. 3

TARGET_RUNS: dict[str, tuple[tuple[str, str], ...]] = {
    "table1": TABLE1_RUNS,
    "table2": TABLE1_RUNS,
    "table3": ABLATION_STE_RUNS,
    "table4": TAU_SWEEP_RUNS,
    "table5": TOKEN_CURVE_RUNS,
    "table6": TOKEN_CURVE_RUNS,
    "fig2": NO_GATE_RUNS,
    "fig3": HEATMAP_RUNS,
}
# target → its script in experiments/ (Tables 5 and 6 are the same experiment at the 1B and 7B scales)
TARGET_SCRIPTS = {
    "table1": "table1.py",
    "table2": "table2.py",
    "table3": "ablation_ste.py",
    "table4": "tau_sweep.py",
    "table5": "token_curve.py",
    "table6": "token_curve.py",
    "fig2": "ablation_no_gate.py",
    "fig3": "heatmap.py",
}
ALL = (
    "table1",
    "table2",
    "table3",
    "table4",
    "table5",
    "fig2",
    "fig3",
)  # `reproduce.sh all` (table6 = table5's script)
TARGETS = (*TARGET_RUNS, "all")


def target_labels(target: str) -> list[tuple[str, str]]:
    """(run, label) pairs of a target; for "all" every target's, in the order `reproduce.sh all` runs them."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    return [pair for t in (ALL if target == "all" else (target,)) for pair in TARGET_RUNS[t]]


def runs_in_order(target: str, available: Iterable[str], needs_dsmoe: Iterable[str] = ()) -> list[str]:
    """The distinct runs a target trains or evaluates, in the order they execute.

    ``available``: the runs the scale defines (others are skipped, as the scripts skip them; "dense" always exists).
    ``needs_dsmoe``: runs that match DSMoE's measured activated fraction, so "dsmoe" runs before them.
    """
    available, needs_dsmoe = set(available) | {DENSE}, set(needs_dsmoe)
    order: list[str] = []
    for run, _ in target_labels(target):
        if run not in available or run in order:
            continue
        if run in needs_dsmoe and "dsmoe" not in order:
            if "dsmoe" not in available:
                raise ValueError(f"run {run!r} matches DSMoE's activated fraction but the scale defines no 'dsmoe' run")
            order.append("dsmoe")
        order.append(run)
    return order
