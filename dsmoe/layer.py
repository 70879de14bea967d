"""DSMoEMLP: a SwiGLU FFN partitioned into n experts with thresholded sigmoid gates (paper §4).

Expert i owns intermediate channels [i·m, (i+1)·m) of gate_proj (W), up_proj (U) and down_proj (V),
m = D/n, so the three pre-trained matrices are kept as they are and the layer's state dict is the
dense one plus ``router.weight`` (the paper's Y, stored transposed as an nn.Linear). The partition,
gates and masked forward live in :mod:`dsmoe.hf_remote.partitioned_swiglu`, shared with saved models.
"""

from __future__ import annotations

import torch

import dsmoe.fast as fast
from dsmoe.config import DSMoEConfig
from dsmoe.hf_remote.partitioned_swiglu import SwiGLUParts, ThresholdGatedSwiGLU


class DSMoEMLP(ThresholdGatedSwiGLU):
    """h = n/#active · Σ_i o_i·G(σ(x·Y_i)) with o_i = (act(x·W_i) ⊙ x·U_i)·V_i (eqs. 6–8).

    Training weights per variant: "dsmoe" uses S(g) = sg(G(g)) + g − sg(g) (eqs. 10–11), "no_ste"
    uses G(g) (eq. 7), "no_gate" uses σ(xY) with no threshold and no rescale (eq. 20). In eval mode
    every variant applies G and eq. 8 with the current τ and computes only the active experts.
    The gates and weights are :class:`ThresholdGatedSwiGLU`'s (the HF remote code of saved models);
    this class adds the sparse inference paths and the activation statistics.
    """

    def __init__(self, ffn: SwiGLUParts, config: DSMoEConfig) -> None:
        super().__init__(ffn, config.num_experts, config.tau, config.variant)
        # eval: "sparse" computes only the active experts (grouped, with host-side counts); "masked" the dense
        # reference path, which needs no host sync; "auto": sparse on the CPU, masked on accelerators.
        self.inference_impl = "auto"
        self.fast_cache: fast.ExpertBlocks | None = None  # expert-major down_proj copy and run views, see dsmoe.fast
        self.last_gates: torch.Tensor | None = None  # σ(xY) [tokens, n] of the last forward, with its graph
        # eval mode, since reset_stats(): tokens per expert and tokens counted, on the host where a path reads the
        # counts anyway and on the layer's device where it does not (no host sync per layer or batch on a GPU)
        self._host_counts = [0] * config.num_experts
        self._device_counts: torch.Tensor | None = None
        self._host_tokens = 0
        self._device_tokens: torch.Tensor | None = None
        # eval mode: which rows of the next forwards the statistics count (e.g. not a padded batch's padding), and
        # how many (a host int, or a 0-d tensor on the device)
        self._counted: tuple[torch.Tensor, int | torch.Tensor] | None = None

    @property
    def last_active(self) -> torch.Tensor | None:
        """bool [tokens, n]: the experts active in the last forward (σ(xY) > τ)."""
        return None if self.last_gates is None else self.last_gates.detach() > self.tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        impl = fast.chosen_path(self.inference_impl, x)
        counted = None if self.training else self._counted_rows(x2.shape[0])
        if x2.shape[0] == 1 and not self.training and impl == "sparse":
            out, g, used = fast.decode_token(self, x2)
            self.__dict__["last_gates"] = g
            if counted is None or counted[1]:
                self.count_active(used, 1)
            return out.reshape(*shape[:-1], out.shape[-1])
        g = self.gates(x2)
        weights, active = self.expert_weights(g)
        self.__dict__["last_gates"] = g  # a plain attribute, not through nn.Module.__setattr__: runs per layer
        if self.training:
            out = self.masked_forward(x2, weights)
        elif impl == "masked":
            self.count_active(*self._counts(active, counted))
            out = self.masked_forward(x2, weights)
        else:  # only the active experts, see dsmoe.fast
            counts = active.sum(0).tolist()
            self.count_active(*((counts, x2.shape[0]) if counted is None else self._counts(active, counted)))
            out = fast.sparse_forward(self, x2, weights, active, counts=counts)
        return out.reshape(*shape[:-1], out.shape[-1])

    def count_only(self, rows: torch.Tensor | None, count: int | torch.Tensor | None = None) -> None:
        """Make the eval-mode statistics of the next forwards count only the token positions where ``rows`` (bool,
        [batch, seq] or flat) is True, e.g. not a padded batch's padding; None: every position again. ``count``:
        rows' True positions if the caller knows them (computed once for every layer; a tensor stays on its
        device, no host sync)."""
        if rows is None:
            self._counted = None
        else:
            rows = rows.reshape(-1).to(device=self.router.weight.device, dtype=torch.bool)
            count = rows.sum() if count is None else count
            self._counted = rows, count.to(rows.device) if isinstance(count, torch.Tensor) else count

    def _counted_rows(self, n_rows: int) -> tuple[torch.Tensor, int] | None:
        if self._counted is not None and self._counted[0].numel() != n_rows:
            raise ValueError(
                f"count_only was given {self._counted[0].numel()} token positions but the forward has {n_rows}; "
                "set it per batch (or to None)"
            )
        return self._counted

    @staticmethod
    def _counts(
        active: torch.Tensor, counted: tuple[torch.Tensor, int | torch.Tensor] | None
    ) -> tuple[torch.Tensor, int | torch.Tensor]:
        """Tokens per expert (on the device: no host sync) and the token count of the positions counted."""
        if counted is None:
            return active.sum(0), active.shape[0]
        return (active & counted[0][:, None]).sum(0), counted[1]

    def count_active(self, counts: list[int] | torch.Tensor, tokens: int | torch.Tensor) -> None:
        """Add an eval-mode forward's tokens per expert and its token count to the statistics (host ints, or
        tensors kept on their device)."""
        if isinstance(counts, torch.Tensor):
            counts = counts.detach().long()
            self._device_counts = counts if self._device_counts is None else self._device_counts + counts
        else:
            for i, c in enumerate(counts):
                self._host_counts[i] += c
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().long()
            self._device_tokens = tokens if self._device_tokens is None else self._device_tokens + tokens
        else:
            self._host_tokens += tokens

    @property
    def tokens_seen(self) -> int:
        """Tokens counted since reset_stats() (reads a device-side count to the host)."""
        return self._host_tokens + (0 if self._device_tokens is None else int(self._device_tokens))

    @property
    def expert_tokens(self) -> list[int]:
        """Tokens per expert since reset_stats() (reads device-side counts to the host)."""
        if self._device_counts is None:
            return list(self._host_counts)
        return [a + b for a, b in zip(self._host_counts, self._device_counts.tolist(), strict=True)]

    def reset_stats(self, expert_tokens: list[int] | None = None, tokens: int = 0) -> None:
        """Zero the statistics, or set them (e.g. to sums over processes)."""
        self._host_counts = list(expert_tokens) if expert_tokens is not None else [0] * self.num_experts
        self._device_counts = None
        self._host_tokens, self._device_tokens = tokens, None
