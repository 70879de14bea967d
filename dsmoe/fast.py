"""Eval-mode execution of a DSMoE FFN that reads and computes only the active experts (paper §4, eq. 8).

``sparse_forward`` gives the masked reference h = Σ_i w_i·o_i, w_i = G(σ(x·Y_i))·n/#active and
o_i = (act(x·W_i) ⊙ x·U_i)·V_i, expert i owning channels [i·m, (i+1)·m), reading and computing only the
experts in use:

- decode (a few tokens, e.g. batch-1 generation): the union of the tokens' active experts, split into
  runs of adjacent experts; a run [a, b) is one contiguous block of W, of U and of an expert-major copy
  of Vᵀ, so each run is one GEMV chain over exactly the weights it needs. A single token goes through
  ``decode_token``, which also does the gating (eqs. 7–8) with a handful of ops instead of a dozen.
- prefill (more tokens): each expert's tokens are gathered, pass one GEMM chain, and are scatter-added
  back; experts that (nearly) every token uses are computed as runs over all tokens instead.

The rows of W and U of an expert are contiguous in the dense layout, its columns of V (down_proj) are
not: :class:`ExpertBlocks` keeps a contiguous [n, m, d] copy of Vᵀ (one third of the FFN's weights; MKL's
batch-1 GEMV streams its row blocks 1.4-2.8× faster than V's column blocks) and the per-run weight views,
and is rebuilt when any of the three weights is replaced, moved or modified in place. It lives in the
plain attribute ``layer.fast_cache``, not a buffer, so the state dict, save/load and training are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import SiLUActivation

from dsmoe.hf_remote.partitioned_swiglu import PartitionedSwiGLU, ThresholdGatedSwiGLU

DECODE_MAX_TOKENS = 4  # up to this many tokens every used expert is computed for all of them: fewest ops
DENSE_EXPERT_FRACTION = 0.9  # in larger batches, experts used by this share of tokens skip the gather/scatter

_SILU_MODULES = (nn.SiLU, SiLUActivation)
RunWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]


def chosen_path(choice: str, x: torch.Tensor) -> str:
    """``choice`` ("sparse", "masked") or, for "auto", "sparse" on the CPU and "masked" on accelerators, where the
    sparse path's host-side counts would sync every layer."""
    if choice != "auto":
        return choice
    return "sparse" if x.device.type == "cpu" else "masked"


def _weights(layer: PartitionedSwiGLU) -> tuple[torch.Tensor, ...]:
    # through the module dicts: nn.Module.__getattr__ would cost ~3 µs per decode step and layer
    modules = layer._modules
    return tuple(modules[name]._parameters["weight"] for name in ("gate_proj", "up_proj", "down_proj"))


def _version(w: torch.Tensor) -> int:
    return -1 if w.is_inference() else w._version  # inference tensors have no version counter


class ExpertBlocks:
    """Weights of runs of adjacent experts [a, b): (W_sᵀ, U_sᵀ, Vᵀ_s, gate bias_s, up bias_s), s = [a·m, b·m).

    With ``cached`` the Vᵀ blocks come from one contiguous expert-major copy and the views are kept;
    otherwise (gradients wanted in eval mode) they are strided views of the live parameters.
    """

    def __init__(self, layer: PartitionedSwiGLU, cached: bool) -> None:
        self.cached = cached
        self.sources = [(w, w.data_ptr(), _version(w)) for w in _weights(layer)]
        down = layer.down_proj.weight.t()
        if cached:
            down = down.detach().contiguous()
        self.down = down.view(layer.num_experts, layer.expert_size, -1)  # [n, m, d_out]
        self.runs: dict[tuple[int, int], RunWeights] = {}

    def is_current(self, layer: PartitionedSwiGLU) -> bool:
        for (old, ptr, version), w in zip(self.sources, _weights(layer), strict=True):
            if old is not w or ptr != w.data_ptr() or version != _version(w):
                return False
        return True

    def run(self, layer: PartitionedSwiGLU, a: int, b: int) -> RunWeights:
        weights = self.runs.get((a, b))
        if weights is None:
            m = layer.expert_size
            s = slice(a * m, b * m)
            biases = [None if p.bias is None else p.bias[s] for p in (layer.gate_proj, layer.up_proj)]
            # a run of every expert reads V as it is: for FFNs larger than SmolLM2's MKL's GEMV streams it faster
            # than Vᵀ (1.17× at LLaMA-7B's shape), and at 100% active the layer then computes as the dense one
            full = b - a == layer.num_experts
            down = layer.down_proj.weight.t() if full else self.down[a:b].flatten(0, 1)
            weights = (layer.gate_proj.weight[s].t(), layer.up_proj.weight[s].t(), down, *biases)
            if self.cached:
                weights = tuple(None if w is None else w.detach() for w in weights)
                self.runs[(a, b)] = weights
        return weights


def expert_blocks(layer: PartitionedSwiGLU) -> ExpertBlocks:
    """The layer's cached :class:`ExpertBlocks`, rebuilt if stale; uncached views when autograd needs them and
    off the CPU (the expert-major copy is a CPU GEMV layout gain; on a GPU, and under FSDP, whose weights are
    gathered per forward, a copy would only cost memory).

    Staleness is seen through each weight's identity, storage and version counter (replacing a parameter,
    ``.to()``, ``load_state_dict``, optimizer steps). Writes through ``.data``, and in-place writes to
    inference tensors, are not seen: set ``layer.fast_cache = None`` after those.
    """
    weights = _weights(layer)
    if weights[2].device.type != "cpu" or (torch.is_grad_enabled() and any(w.requires_grad for w in weights)):
        return ExpertBlocks(layer, cached=False)
    if layer.fast_cache is None or not layer.fast_cache.is_current(layer):
        layer.fast_cache = None  # free the old copy before building the new one
        with torch.inference_mode(False), torch.no_grad():  # usable later outside inference mode too
            layer.fast_cache = ExpertBlocks(layer, cached=True)
    return layer.fast_cache


def expert_runs(used: list[bool]) -> list[tuple[int, int]]:
    """Per-expert flags → half-open runs of adjacent used experts, e.g. [1, 1, 0, 0, 1] → [(0, 2), (4, 5)]."""
    runs: list[tuple[int, int]] = []
    for i, flag in enumerate(used):
        if not flag:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _activation(layer: PartitionedSwiGLU) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer's activation, as the plain function for SiLU modules (a module call costs µs per decode run)."""
    act = layer.act_fn
    return F.silu if type(act) in _SILU_MODULES else act


def _expert_chain(
    act: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, run: RunWeights, scale: torch.Tensor | None
) -> torch.Tensor:
    """act(x·W_s) ⊙ (x·U_s) [⊙ scale] for a run's channels s; scale [T, b−a, 1] holds each expert's weight."""
    gate_t, up_t, _, gate_b, up_b = run
    up = torch.mm(x, up_t) if up_b is None else torch.addmm(up_b, x, up_t)
    if scale is not None:
        up.view(x.shape[0], scale.shape[1], -1).mul_(scale)
    gate = torch.mm(x, gate_t) if gate_b is None else torch.addmm(gate_b, x, gate_t)
    return act(gate).mul_(up)


def _finish(layer: PartitionedSwiGLU, out: torch.Tensor) -> torch.Tensor:
    return out if layer.down_proj.bias is None else out.add_(layer.down_proj.bias)


def decode_token(layer: ThresholdGatedSwiGLU, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """h for one token x [1, d] (batch-1 decode), gates to output, equal to the masked reference; returns h, the
    gates σ(xY) and which experts were active (the layer records the last two).

    The gate logic of eqs. 7–8 runs on the n gate values as Python floats (one host read). An active expert's
    weight g_i·n/k is applied as the down GEMM's alpha for an expert alone in its run (when no gradient is
    wanted), as g_i on the channels and n/k as alpha for a longer run. A decode step thus costs the router,
    the active experts' runs and few small ops besides.
    """
    g = layer.gates(x)
    gates = g[0].tolist()
    used = (g[0] > layer.tau).tolist()  # the tensor comparison of the other paths (τ rounded to g's dtype)
    k = sum(used)
    out = x.new_zeros(1, layer.down_proj.out_features)
    if k:
        scale, host_weights = (layer.num_experts / k if layer.rescale else 1.0), not torch.is_grad_enabled()
        gate_view, act, blocks = g.view(1, -1, 1), _activation(layer), expert_blocks(layer)
        for a, b in expert_runs(used):
            run = blocks.run(layer, a, b)
            # out-of-place addmm: under autocast it runs in the autocast dtype, an in-place one would not
            if b - a == 1 and host_weights:
                out = torch.addmm(out, _expert_chain(act, x, run, None), run[2], alpha=gates[a] * scale)
            else:
                out = torch.addmm(out, _expert_chain(act, x, run, gate_view[:, a:b]), run[2], alpha=scale)
    return _finish(layer, out), g, used


def sparse_forward(
    layer: PartitionedSwiGLU,
    x: torch.Tensor,
    weights: torch.Tensor,
    active: torch.Tensor,
    dense_fraction: float | None = None,
    counts: list[int] | None = None,
) -> torch.Tensor:
    """h for x [T, d] from the active experts only; equal to the masked reference.

    An expert used by at least ``dense_fraction`` of the tokens is computed for every token (its weight is
    0 where it is inactive), adjacent such experts in one run [a, b) with one GEMM chain over their
    contiguous weight blocks. Every other used expert is computed on its gathered tokens and scatter-added.
    The default, 0 for at most DECODE_MAX_TOKENS tokens (decode: the union of the tokens' experts) and
    DENSE_EXPERT_FRACTION otherwise (prefill), spares the gather/scatter where it would cost more than it saves.
    ``counts`` (tokens per expert, ``active.sum(0)``) is read from ``active`` when not given.
    """
    tokens = x.shape[0]
    if dense_fraction is None:
        dense_fraction = 0.0 if tokens <= DECODE_MAX_TOKENS else DENSE_EXPERT_FRACTION
    if counts is None:
        counts = active.sum(0).tolist()
    whole = [c > 0 and c >= dense_fraction * tokens for c in counts]
    scale = weights.to(x.dtype).unsqueeze(-1)  # [T, n, 1]
    blocks = expert_blocks(layer) if any(counts) else None
    act = _activation(layer)
    out = None
    for a, b in expert_runs(whole):
        run = blocks.run(layer, a, b)
        h = _expert_chain(act, x, run, scale[:, a:b])
        out = torch.mm(h, run[2]) if out is None else torch.addmm(out, h, run[2])  # out-of-place: autocast-safe
    if out is None:
        out = x.new_zeros(tokens, layer.down_proj.out_features)
    gathered = [i for i, count in enumerate(counts) if count and not whole[i]]
    for i, idx in zip(gathered, expert_token_indices(active, gathered, counts), strict=True):
        run = blocks.run(layer, i, i + 1)
        h = _expert_chain(act, x.index_select(0, idx), run, scale[idx, i : i + 1])
        out.index_add_(0, idx, torch.mm(h, run[2]).to(out.dtype))  # under autocast the product may be bf16
    return _finish(layer, out)


def expert_token_indices(
    active: torch.Tensor, experts: list[int], counts: list[int], one_call: bool | None = None
) -> list[torch.Tensor]:
    """The token indices of each of ``experts`` (``counts``: tokens per expert, already on the host).

    On the CPU one ``nonzero`` per expert is fastest; on an accelerator each would be a device sync, so all are found
    by one ``nonzero_static`` of the expert-major mask, whose size the host counts give (no sync at all)."""
    if one_call is None:
        one_call = active.device.type != "cpu"
    if not one_call:
        return [active[:, i].nonzero().flatten() for i in experts]
    if not experts:
        return []
    sizes = [counts[i] for i in experts]
    positions = torch.nonzero_static(active[:, experts].t().reshape(-1), size=sum(sizes)).flatten()
    tokens = active.shape[0]
    return [p - j * tokens for j, p in enumerate(positions.split(sizes))]
