"""Table 2: downstream benchmarks (lm-eval task definitions; offline copies when the hub is unreachable).

    python experiments/table2.py [--scale demo] [--limit N]   → results/<scale>/table2_benchmarks.csv

Zero-shot: HellaSwag, LAMBADA, PIQA, SIQA, StoryCloze, Winogrande; 5-shot exact match: GSM8K,
NaturalQuestions, TriviaQA, WebQuestions. DSMoE routing is active inside lm-eval's forward passes.
Scores are percentages; StoryCloze is "unavailable offline" where its licence-gated data is missing.
"""

from dsmoe.benchmarks import PAPER_TASKS, run_benchmarks
from dsmoe.experiment import cached, ensure_run, evaluate, parse_scale, results_dir, runs_root, scale_config
from dsmoe.models import load_model
from dsmoe.results import PROVENANCE, write_csv
from dsmoe.targets import TABLE1_RUNS as RUNS


def benchmark(scale: str, run: str, limit: int | None, max_gen_toks: int, batch_size: int) -> dict:
    source = scale_config(scale).base.model if run == "dense" else str(ensure_run(scale, run))

    def compute() -> dict:
        model, tokenizer = load_model(source)
        return run_benchmarks(model, tokenizer, limit=limit, batch_size=batch_size, max_gen_toks=max_gen_toks)

    return cached(runs_root(scale) / run / f"benchmarks_limit{limit}.json", compute)


def row(label: str, results: dict, limit: int | None, provenance: dict) -> dict:
    out = {"Model": label}
    for task in PAPER_TASKS:
        r = results[task.name]
        out[task.column] = 100 * r["value"] if r["status"] == "ok" else r["status"]
    first = next(r for r in results.values() if r["status"] == "ok")
    out.update({"limit": limit if limit is not None else "full", "data": first["source"], **provenance})
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_scale(__doc__, argv)
    sc = scale_config(args.scale)
    limit = args.limit if args.limit is not None else sc.eval.benchmark_limit
    rows = []
    for run, label in RUNS:
        if run != "dense" and run not in sc.methods:
            continue
        results = benchmark(args.scale, run, limit, sc.eval.max_gen_toks, sc.eval.batch_size)
        rows.append(row(label, results, limit, evaluate(args.scale, run)["provenance"]))
        print(label, {t.column: rows[-1][t.column] for t in PAPER_TASKS})
    columns = ["Model", *[t.column for t in PAPER_TASKS], "limit", "data", *PROVENANCE]
    print(f"wrote {write_csv(results_dir(args.scale) / 'table2_benchmarks.csv', rows, columns)}")


if __name__ == "__main__":
    main()
