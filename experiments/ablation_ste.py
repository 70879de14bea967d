"""Table 3: DSMoE vs DSMoE without the straight-through estimator S(x) (G(x) used in training, eq. 7).

    python experiments/ablation_ste.py [--scale demo] [--limit N] [--seeds N]   → results/<scale>/table3_ablation_ste.csv

Both runs use identical data, steps and settings; rows are the benchmarks of Table 2 and PPL (means over the seeds,
with their sd; benchmarks also with lm-eval's standard error over the items, se).
"""

from dsmoe import experiment as ex
from dsmoe.benchmarks import PAPER_TASKS
from dsmoe.cli import run as run_cli
from dsmoe.results import PROVENANCE, write_csv
from dsmoe.targets import ABLATION_STE_RUNS


def main(argv: list[str] | None = None) -> None:
    args = ex.parse_scale(__doc__, argv)
    limit = args.limit
    seeds = range(args.seeds)
    evals = {run: [ex.evaluate(args.scale, run, seed=s) for s in seeds] for run, _ in ABLATION_STE_RUNS}
    scored = ex.benchmarks(args.scale, [(run, s) for run, _ in ABLATION_STE_RUNS for s in seeds], limit)
    bench = {run: [scored[run, s] for s in seeds] for run, _ in ABLATION_STE_RUNS}
    measures = [(t.column, lambda run, t=t: ex.benchmark_scores(bench[run], t.name)) for t in PAPER_TASKS]
    stderr = {t.column: lambda run, t=t: ex.benchmark_stderr(bench[run], t.name) for t in PAPER_TASKS}
    measures.append(("PPL", lambda run: [r["ppl"] for r in evals[run]]))
    measures.append(("Activated %", lambda run: [100 * r["activated_fraction"] for r in evals[run]]))
    provenance = {**ex.seeds_provenance(evals["dsmoe"]), "method": "dsmoe vs dsmoe(no_ste)"}
    rows = []
    for name, values in measures:
        row = {"Model": name}
        for run, label in ABLATION_STE_RUNS:
            scores = values(run)
            if isinstance(scores, str):
                row[label] = scores
            else:
                ex.with_spread(row, label, scores)
                if name in stderr:
                    row[f"{label} se"] = stderr[name](run)
        rows.append({**row, "seeds": len(seeds), "limit": limit or "full", **provenance})
        print({k: row.get(k) for k in ("Model", *(label for _, label in ABLATION_STE_RUNS))})
    labels = [c for _, label in ABLATION_STE_RUNS for c in (label, f"{label} sd", f"{label} se")]
    columns = ["Model", *labels, "seeds", "limit", *PROVENANCE]
    print(f"wrote {write_csv(ex.results_dir(args.scale) / 'table3_ablation_ste.csv', rows, columns)}")


if __name__ == "__main__":
    run_cli(main)
