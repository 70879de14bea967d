"""Table 3: DSMoE vs DSMoE without the straight-through estimator S(x) (G(x) used in training, eq. 7).

    python experiments/ablation_ste.py [--scale demo] [--limit N]   → results/<scale>/table3_ablation_ste.csv

Both runs use identical data, steps and settings; rows are the benchmarks of Table 2 and PPL.
"""

from table2 import benchmark

from dsmoe.benchmarks import PAPER_TASKS
from dsmoe.experiment import evaluate, parse_scale, results_dir, scale_config
from dsmoe.results import PROVENANCE, write_csv
from dsmoe.targets import ABLATION_STE_RUNS as RUNS


def main(argv: list[str] | None = None) -> None:
    args = parse_scale(__doc__, argv)
    sc = scale_config(args.scale)
    limit = args.limit if args.limit is not None else sc.eval.benchmark_limit
    evals = {run: evaluate(args.scale, run) for run, _ in RUNS}
    bench = {run: benchmark(args.scale, run, limit, sc.eval.max_gen_toks, sc.eval.batch_size) for run, _ in RUNS}
    rows = []
    for task in PAPER_TASKS:
        r = {label: bench[run][task.name] for run, label in RUNS}
        rows.append(
            {
                "Model": task.column,
                **{k: 100 * v["value"] if v["status"] == "ok" else v["status"] for k, v in r.items()},
            }
        )
    rows.append({"Model": "PPL", **{label: evals[run]["ppl"] for run, label in RUNS}})
    rows.append({"Model": "Activated %", **{label: 100 * evals[run]["activated_fraction"] for run, label in RUNS}})
    for r in rows:
        r.update(
            {
                **evals["dsmoe"]["provenance"],
                "method": "dsmoe vs dsmoe(no_ste)",
                "limit": limit if limit is not None else "full",
            }
        )
        print({k: r[k] for k in ("Model", "DSMoE", "w/o S(x)")})
    columns = ["Model", "DSMoE", "w/o S(x)", "limit", *PROVENANCE]
    print(f"wrote {write_csv(results_dir(args.scale) / 'table3_ablation_ste.csv', rows, columns)}")


if __name__ == "__main__":
    main()
