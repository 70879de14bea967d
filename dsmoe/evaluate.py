"""Perplexity with DSMoE routing active, and activation statistics measured during it (Table 1)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

CountOnly = Callable[[nn.Module, "torch.Tensor | None"], None]


@dataclass
class PerplexityResult:
    nll_sum: float
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / max(self.tokens, 1))


def on_device_of(model: nn.Module) -> contextlib.AbstractContextManager:
    """Make the model's GPU the current device of the calling thread (a new thread starts on cuda:0): whatever
    allocates on "cuda" without an index, or syncs the current device, then uses the replica's GPU."""
    device = next(model.parameters()).device
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _batch_nll(model: nn.Module, chunk: list[torch.Tensor], count_only: CountOnly | None) -> tuple[float, int]:
    """Σ −log p over the predicted tokens of a batch of windows (padded to the longest) and their count."""
    device = next(model.parameters()).device
    length = max(w.numel() for w in chunk)
    ids = torch.zeros(len(chunk), length, dtype=torch.long)
    mask = torch.zeros(len(chunk), length, dtype=torch.bool)
    for i, w in enumerate(chunk):
        ids[i, : w.numel()], mask[i, : w.numel()] = w, True
    padded = not mask.all()
    ids, mask = ids.to(device), mask.to(device)
    if count_only is not None and padded:
        count_only(model, mask)
    try:
        logits = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits[:, :-1].float()
    finally:
        if count_only is not None and padded:
            count_only(model, None)
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    valid = mask[:, 1:]
    return -logp[valid].double().sum().item(), int(valid.sum())


@torch.no_grad()
def perplexity(
    model: nn.Module | Sequence[nn.Module],
    windows: Iterable[torch.Tensor],
    batch_size: int = 4,
    desc: str = "ppl",
    count_only: CountOnly | None = None,
) -> PerplexityResult:
    """Token-weighted PPL = exp(Σ −log p(x_{t+1}|x_≤t) / #predicted tokens) over windows (eq. 2).

    Each window (a 1-D LongTensor) is scored on its own; its first token is context only. Windows are batched
    longest first; those of unequal length (the documents protocol) are padded to the batch's longest, and
    ``count_only(model, real_tokens)`` (a dynamic method's, e.g. DSMoE's) is called around the forward of a padded
    batch so that activation statistics count its real tokens only. ``model`` may be a list of
    replicas on different devices: batch b goes to replica b mod R, each replica in its own thread (GPU kernels run
    concurrently), and the batch sums are added in batch order, so the result does not depend on R.
    """
    models = list(model) if isinstance(model, Sequence) else [model]
    for m in models:
        m.eval()
    # longest first (stable): documents of similar length share a batch, the least padding (lm-eval orders its
    # requests so too), and a batch size too large for the device fails on the first batch, not the last
    windows = sorted(windows, key=len, reverse=True)
    chunks = [windows[start : start + batch_size] for start in range(0, len(windows), batch_size)]
    sums: list[tuple[float, int] | None] = [None] * len(chunks)
    progress = tqdm(total=len(chunks), desc=desc, leave=False, disable=len(chunks) <= 1)

    def work(r: int) -> None:
        with torch.no_grad(), on_device_of(models[r]):
            for b in range(r, len(chunks), len(models)):
                sums[b] = _batch_nll(models[r], chunks[b], count_only)
                progress.update()

    if len(models) == 1:
        work(0)
    else:
        with ThreadPoolExecutor(len(models)) as pool:
            list(pool.map(work, range(len(models))))  # re-raises a replica's error
    progress.close()
    result = PerplexityResult(sum(s[0] for s in sums), sum(s[1] for s in sums))
    if not math.isfinite(result.nll_sum):  # inf/NaN logits: a numeric fault, not a model that is merely bad
        dtype = next(models[0].parameters()).dtype
        hint = " (float16 overflows where bfloat16 does not: DSMOE_EVAL_DTYPE=bfloat16 or float32)"
        raise ValueError(
            f"{desc}: the model's log-probabilities are not finite (Σ NLL = {result.nll_sum}) in {dtype}"
            + (hint if dtype == torch.float16 else "")
        )
    return result
