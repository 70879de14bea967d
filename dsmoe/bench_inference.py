"""Controls and timing for the inference speed benchmark (experiments/bench_inference.py): dense vs DSMoE.

Forced activation: :class:`ForcedRouter` makes exactly the experts of a given pattern active per token
(:func:`random_pattern`, :func:`spread_pattern`). Layout control: :class:`DenseVtFFN`, the dense FFN reading
down_proj as a contiguous Vᵀ like DSMoE's expert blocks. Timing: :func:`measure` (interleaved blocked_autorange),
:func:`speedup_rows` (median/min ratios against the ideal speedup, :func:`ideal_speedup`). Memory settings:
:func:`keep_freed_memory`, :func:`huge_pages`.
"""

from __future__ import annotations

import ctypes
import os
import re
import statistics
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.benchmark import Timer

from dsmoe.layer import DSMoEMLP

FORCED_LOGIT = 8.0  # σ(±8) ≈ 0.9997 / 0.0003, far from τ = 0.5
TIMING_PROTOCOL = "torch.utils.benchmark blocked_autorange, cases interleaved per round, median of all blocks"
Case = tuple[Callable[[], None], Callable[[], object]]  # (prepare, timed statement)


class ForcedRouter(nn.Module):
    """Zero-weight router plus a per-position logit offset: token t activates exactly the experts of pattern[t].

    The zero weight costs what the real router costs; in decode the offset is the GEMV's bias."""

    def __init__(self, hidden_size: int, num_experts: int, max_tokens: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size), requires_grad=False)
        self.register_buffer("offset", torch.zeros(max_tokens, num_experts))

    def set_pattern(self, active: torch.Tensor) -> None:
        """active: bool [tokens, n]; logit +FORCED_LOGIT for an active expert, −FORCED_LOGIT otherwise."""
        self.offset = active.to(self.offset) * (2 * FORCED_LOGIT) - FORCED_LOGIT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:  # decode: one GEMV with the offset as its bias, as cheap as a router's GEMV
            return nn.functional.linear(x, self.weight, self.offset[0])
        return nn.functional.linear(x, self.weight) + self.offset[: x.shape[0]]


def force_routers(layers: list[DSMoEMLP], max_tokens: int) -> list[ForcedRouter]:
    """Replace each layer's router by a :class:`ForcedRouter` for up to max_tokens tokens; returns them. The layers
    compute only their active experts on any device (the "auto" path is the masked one off the CPU: every expert)."""
    routers = []
    for layer in layers:
        layer.inference_impl = "sparse"
        router = ForcedRouter(layer.gate_proj.in_features, layer.num_experts, max_tokens)
        layer.router = router.to(layer.gate_proj.weight)
        routers.append(layer.router)
    return routers


def random_pattern(tokens: int, active: int, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """bool [tokens, n] with a uniformly random ``active``-subset of the experts per token."""
    order = torch.rand(tokens, num_experts, generator=generator).argsort(-1)
    return torch.zeros(tokens, num_experts, dtype=torch.bool).scatter_(1, order[:, :active], True)


def spread_pattern(tokens: int, active: int, num_experts: int) -> torch.Tensor:
    """bool [tokens, n]: experts ⌊i·n/k⌋, i < k, the same for every token (fewest adjacent experts)."""
    pattern = torch.zeros(tokens, num_experts, dtype=torch.bool)
    pattern[:, [i * num_experts // active for i in range(active)]] = True
    return pattern


class ZeroFFN(nn.Module):
    """No FFN at all: timing a model with these gives the FFNs' share of its time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class DenseVtFFN(nn.Module):
    """Layout control: the dense FFN with down_proj read from a contiguous Vᵀ, the layout of DSMoE's expert blocks.
    Dense vs this isolates the layout's share of a speedup."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.act_fn
        self.down_t = mlp.down_proj.weight.detach().t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.act_fn(self.gate_proj(x)) * self.up_proj(x)) @ self.down_t


def keep_freed_memory() -> str:
    """Tell glibc malloc to keep freed memory: no trimming and no mmap, so every allocation comes from the heap
    and is reused. Otherwise large temporaries are returned to the OS and page-faulted back in on every call
    (measured: 70-100k minor faults per dense 512-token prefill; 55-83k per training step, from the 113 MB
    embedding gradient and the 25 MB logits, which no mmap threshold can keep), which swamps the comparison.
    Applies to dense and DSMoE alike; PyTorch's CPU tuning guide suggests jemalloc/tcmalloc for the same reason.
    Returns the setting, for the results."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default"
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt's parameter numbers (malloc.h)
    ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    return "glibc: no trim, no mmap" if ok else "default"


def huge_pages() -> str:
    """How much of this process's memory sits in transparent huge pages, with the setting that asked for them
    (PyTorch's THP_MEM_ALLOC_ENABLE, read at its first allocation). Applies to dense and DSMoE alike; it helps
    DSMoE's decode more, which reads many small expert blocks (fewer TLB misses), see results/README.md."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            kb = int(re.search(r"AnonHugePages:\s+(\d+) kB", f.read()).group(1))
    except (OSError, AttributeError):
        return "unknown"
    return f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}: {kb >> 10} MB in huge pages"


def measure(cases: dict[str, Case], threads: int, block_time: float, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each case, one blocked_autorange per case per round, cases interleaved in every round
    so that load from other processes hits them alike. Returns every block's time per call."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    torch.set_num_threads(threads)
    for r in range(rounds):
        for name, (prepare, stmt) in cases.items():
            prepare()
            if r == 0:
                stmt()  # warm-up: weight caches, allocator, lazy init
            timer = Timer("stmt()", globals={"stmt": stmt}, num_threads=threads)
            times[name] += timer.blocked_autorange(min_run_time=block_time).times
    return times


def timing(dense: list[float], dsmoe: list[float]) -> dict[str, float]:
    """Median times and their ratio; speedup_min compares the fastest blocks, the estimate least hurt by load."""
    dense_s, dsmoe_s = statistics.median(dense), statistics.median(dsmoe)
    return dict(
        dense_ms=1e3 * dense_s, dsmoe_ms=1e3 * dsmoe_s, speedup=dense_s / dsmoe_s, speedup_min=min(dense) / min(dsmoe)
    )


def ffn_share(dense: list[float], no_ffn: list[float]) -> float:
    """s, the FFNs' share of the dense model's time: 1 − median(no FFN) / median(dense)."""
    return 1 - statistics.median(no_ffn) / statistics.median(dense)


def ideal_speedup(active: int, num_experts: int, share: float = 1.0) -> float:
    """1/(1 − s + s·k/n): the speedup if the FFN time (share s) shrank to the active fraction k/n; 1/(k/n) for
    the FFNs alone (s = 1)."""
    return 1 / (1 - share + share * active / num_experts)


def speedup_rows(
    times: dict[str, list[float]], common: dict, active_counts: tuple[int, ...], num_experts: int, share: float | None
) -> list[dict]:
    """Rows of ``common`` plus the timing of each case against ``times["dense"]``: the layout control
    ``times["dense_vt"]`` and DSMoE at each active count k (``times["k={k}"]``) with its ideal speedup, that of
    the FFNs alone (share None) or of a model whose FFNs take the measured share of the time."""
    basis = "1/activation" if share is None else "measured FFN time share s: 1/(1-s+s*a)"
    if share is not None:
        common = dict(common, ffn_share=share)
    t = timing(times["dense"], times["dense_vt"])
    control = dict(active_experts=num_experts, num_experts=num_experts, activation=1.0, **t, ideal_speedup=1.0)
    control.update(frac_of_ideal=t["speedup"], ideal_basis="no sparsity: the down_proj layout alone")
    control.update(variant="dense_vt", pattern="dense FFN, down_proj as contiguous Vᵀ (layout control)")
    rows = [dict(common, **control)]
    for k in active_counts:
        t = timing(times["dense"], times[f"k={k}"])
        ideal = ideal_speedup(k, num_experts, 1.0 if share is None else share)
        rows.append(
            dict(
                common,
                variant="dsmoe",
                active_experts=k,
                num_experts=num_experts,
                activation=k / num_experts,
                **t,
                ideal_speedup=ideal,
                frac_of_ideal=t["speedup"] / ideal,
                ideal_basis=basis,
            )
        )
    return rows
