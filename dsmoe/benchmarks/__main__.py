"""``python -m dsmoe.benchmarks setup`` fetches the offline copies; ``run`` evaluates a model on them (JSON out), on
the first GPU in bf16 when there is one (else the CPU in fp32), as the experiment scripts score each model."""

from __future__ import annotations

import argparse
import json
import logging
import time

from dsmoe.benchmarks.data import setup_benchmarks
from dsmoe.benchmarks.harness import PAPER_TASKS, run_benchmarks, select_tasks
from dsmoe.cli import run as run_cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dsmoe.benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("setup", help="fetch, extract and convert the offline benchmark copies")
    setup.add_argument("--force", action="store_true", help="redo everything even if the manifest is current")
    run = sub.add_parser("run", help="evaluate a model (hub id, local dir, or the embedded alias)")
    run.add_argument("--model", default="embedded:smollm2-135m")
    run.add_argument("--tasks", default=",".join(t.name for t in PAPER_TASKS), help="comma-separated")
    run.add_argument("--limit", type=float, default=None, help="items per task (or a fraction < 1)")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--max-gen-toks", type=int, default=None)
    where = run.add_mutually_exclusive_group()
    where.add_argument("--offline", dest="offline", action="store_true", default=None)
    where.add_argument("--hub", dest="offline", action="store_false")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "setup":
        manifest = setup_benchmarks(force=args.force)
        print(json.dumps({name: rec["items"] for name, rec in manifest["tasks"].items()} | manifest["unavailable"]))
        return
    from dsmoe.experiment import load_for_eval

    tasks = [t.name for t in select_tasks(args.tasks.split(","))]  # fail on a bad name before loading
    model, tokenizer = load_for_eval(args.model)  # on the first GPU in bf16 when there is one, as the tables
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    start = time.perf_counter()
    results = run_benchmarks(
        model,
        tokenizer,
        tasks=tasks,
        limit=limit,
        batch_size=args.batch_size,
        offline=args.offline,
        max_gen_toks=args.max_gen_toks,
    )
    seconds = time.perf_counter() - start
    where = {"device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype)}
    print(json.dumps({"model": args.model, **where, "seconds": seconds, "results": results}, indent=2))


if __name__ == "__main__":
    run_cli(main)
