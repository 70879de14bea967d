"""Perplexity with DSMoE routing active, and activation statistics measured during it (Table 1).

    python -m dsmoe.evaluate --model DIR --data my.jsonl other.parquet [--docs 100] [--tau 0.6]

scores a model (a saved run of any method, an HF model directory, a hub id, or the embedded alias) on local text
files, one source per file, and prints JSON: PPL overall and per file, and for DSMoE the activated parameters
and the mean active experts per layer. On every GPU in bf16 when there are any, else the CPU in fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

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


def file_documents(path: str, text_field: str, limit: int) -> list[str]:
    """The first ``limit`` non-empty documents of a local data file (jsonl, parquet, ...: the training readers)."""
    from dsmoe.data.files import read_batches, text_values
    from dsmoe.data.sources import SourceConfig, resolve_files

    files = resolve_files(SourceConfig(name=Path(path).name, data_files=path, text_field=text_field))
    documents: list[str] = []
    for index in range(len(files.files)):
        for table in read_batches(files, index):
            documents += [t for t in text_values(table, files, index) if t and t.strip()][: limit - len(documents)]
            if len(documents) == limit:
                return documents
    return documents


def data_paths(pattern: str) -> list[str]:
    """The files of a --data argument: a path, or a glob (each file its own source)."""
    if not glob.has_magic(pattern):
        return [pattern]
    found = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not found:
        raise FileNotFoundError(f"--data {pattern!r} matches no file")
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m dsmoe.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="a saved directory, an HF model directory, a hub id, or 'embedded'"
    )
    parser.add_argument("--data", nargs="+", required=True, help="local data files or globs; each file its own source")
    parser.add_argument("--text-field", default="text", help="the column holding the text (default: text)")
    parser.add_argument("--docs", type=int, default=100, help="the first N documents of each file (default: 100)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per scored sequence (default: 1024)")
    parser.add_argument(
        "--protocol",
        choices=["documents", "windows"],
        default="documents",
        help="documents: each scored alone as BOS + its first seq-len tokens (the paper's §5.1); windows: packed "
        "like training, seq-len + 1 tokens each",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tau", type=float, default=None, help="re-threshold a DSMoE model first (Table 4)")
    args = parser.parse_args(argv)
    for name in ("docs", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")

    from dsmoe.data.tokens import document_eval_sequences, packed_eval_windows
    from dsmoe.experiment import eval_devices, evaluate_model, load_for_eval, replicas
    from dsmoe.methods import method_of_model

    paths = [path for pattern in args.data for path in data_paths(pattern)]
    repeated = sorted({p for p in paths if paths.count(p) > 1})
    if repeated:
        raise ValueError(f"--data names {repeated} more than once")
    documents = {path: file_documents(path, args.text_field, args.docs) for path in paths}  # before the model loads
    model, tokenizer = load_for_eval(args.model)
    dynamic = method_of_model(model).dynamic
    if args.tau is not None:
        if dynamic is None:
            raise ValueError(
                f"--tau {args.tau}: model {args.model!r} has no dynamic activation (DSMoE's) to re-threshold"
            )
        dynamic.set_threshold(model, args.tau)
    score = document_eval_sequences if args.protocol == "documents" else packed_eval_windows
    windows = {path: list(score(tokenizer, texts, args.seq_len)) for path, texts in documents.items()}
    for path, sequences in windows.items():
        if not sequences:
            raise ValueError(f"{path}: nothing to score in its first {args.docs} documents at --seq-len {args.seq_len}")
    result = evaluate_model(replicas(model, eval_devices()), windows, args.batch_size)
    print(json.dumps({"model": args.model, "protocol": args.protocol, "seq_len": args.seq_len, **result}, indent=2))
    return result


if __name__ == "__main__":
    from dsmoe.cli import run as run_cli

    run_cli(main)
