"""Table 2: downstream benchmarks (lm-eval task definitions; offline copies when the hub is unreachable).

    python experiments/table2.py [--scale demo] [--limit N] [--seeds N]   → results/<scale>/table2_benchmarks.csv

Zero-shot: HellaSwag, LAMBADA, PIQA, SIQA, StoryCloze, Winogrande; 5-shot exact match: GSM8K,
NaturalQuestions, TriviaQA, WebQuestions. DSMoE routing is active inside lm-eval's forward passes.
Scores are percentages, means over the seeds with their sd and lm-eval's standard error over the items (se; the
seeds score the same items, so it does not shrink with them); StoryCloze is "unavailable offline" where its
licence-gated data is missing.
"""

from dsmoe.benchmarks import PAPER_TASKS
from dsmoe.cli import run as run_cli
from dsmoe.experiment import (
    benchmark_scores,
    benchmark_stderr,
    benchmarks,
    defined_runs,
    evaluate,
    evaluate_dsmoe_first,
    parse_scale,
    results_dir,
    seeds_provenance,
    with_spread,
)
from dsmoe.results import PROVENANCE, write_csv
from dsmoe.targets import DENSE, TABLE1_RUNS


def main(argv: list[str] | None = None) -> None:
    args = parse_scale(__doc__, argv)
    limit = args.limit
    runs = [
        (run, label, range(args.seeds) if run != DENSE else [0]) for run, label in defined_runs(args.scale, TABLE1_RUNS)
    ]
    evaluate_dsmoe_first(args.scale, args.seeds)
    scored = benchmarks(args.scale, [(run, s) for run, _, seeds in runs for s in seeds], limit)  # all at once
    rows = []
    for run, label, seeds in runs:
        results = [scored[run, s] for s in seeds]
        row = {"Model": label}
        for task in PAPER_TASKS:
            scores = benchmark_scores(results, task.name)
            if isinstance(scores, str):
                row[task.column] = scores
            else:
                with_spread(row, task.column, scores)
                row[f"{task.column} se"] = benchmark_stderr(results, task.name)
        first = next(r for r in results[0].values() if r["status"] == "ok")
        provenance = seeds_provenance([evaluate(args.scale, run, seed=s) for s in seeds])
        rows.append({**row, "seeds": len(results), "limit": limit or "full", "data": first["source"], **provenance})
        print(label, {t.column: rows[-1][t.column] for t in PAPER_TASKS})
    scores = [c for t in PAPER_TASKS for c in (t.column, f"{t.column} sd", f"{t.column} se")]
    columns = ["Model", *scores, "seeds", "limit", "data", *PROVENANCE]
    print(f"wrote {write_csv(results_dir(args.scale) / 'table2_benchmarks.csv', rows, columns)}")


if __name__ == "__main__":
    run_cli(main)
