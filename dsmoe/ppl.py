"""Perplexity of a model on local text files, from the command line (``dsmoe.evaluate`` measures it):

    python -m dsmoe.ppl --model DIR --data my.jsonl other.parquet [--docs 100] [--tau 0.6]

scores a model (a saved run of any method, an HF model directory, a hub id, or the embedded alias) on local text
files, one source per file, and prints JSON: PPL overall and per file, and for DSMoE the activated parameters
and the mean active experts per layer. On every GPU in bf16 when there are any, else the CPU in fp32.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from pathlib import Path

from dsmoe.cli import run as run_cli
from dsmoe.data.holdout import first_usable
from dsmoe.data.reader import UnusableRows
from dsmoe.data.sources import SourceConfig, resolve_files
from dsmoe.data.tokens import document_eval_sequences, packed_eval_windows
from dsmoe.experiment import eval_devices, evaluate_model, load_for_eval, replicas
from dsmoe.methods import method_of_model


def file_documents(path: str, text_field: str, limit: int) -> list[str]:
    """The first ``limit`` usable documents of a local data file (jsonl, parquet, ...: the training readers)."""
    files = resolve_files(SourceConfig(name=Path(path).name, data_files=path, text_field=text_field))
    return [text for _, text in first_usable(files, limit, UnusableRows())]


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
        prog="python -m dsmoe.ppl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
    run_cli(main)
