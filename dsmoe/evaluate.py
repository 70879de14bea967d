"""Perplexity with DSMoE routing active, and activation statistics measured during it (Table 1)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    nll_sum: float
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / max(self.tokens, 1))


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: Iterable[torch.Tensor], batch_size: int = 4, desc: str = "ppl"
) -> PerplexityResult:
    """Token-weighted PPL = exp(Σ −log p(x_{t+1}|x_≤t) / #predicted tokens) over windows (eq. 2).

    Each window (a 1-D LongTensor) is scored on its own; its first token is context only.
    """
    model.eval()
    device = next(model.parameters()).device
    windows = list(windows)
    nll, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, leave=False, disable=len(windows) <= batch_size):
        chunk = windows[start : start + batch_size]
        length = max(w.numel() for w in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros(len(chunk), length, dtype=torch.bool)
        for i, w in enumerate(chunk):
            ids[i, : w.numel()], mask[i, : w.numel()] = w, True
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        valid = mask[:, 1:]
        nll -= logp[valid].double().sum().item()
        count += int(valid.sum())
    return PerplexityResult(nll, count)
