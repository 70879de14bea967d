"""Table 1: perplexity of the dense model, DSMoE and the baselines at matched activated parameters.

    python experiments/table1.py [--scale demo|smollm2|llama1b|llama7b]   → results/<scale>/table1_ppl.csv

DSMoE trains first; its activated-parameter fraction, measured on the validation set, is the target
every baseline matches (SparseGPT sparsity, LLaMA-MoE k, LLM-Pruner widths). All runs use the same
data, steps and optimizer settings.
"""

from dsmoe.experiment import evaluate, parse_scale, results_dir, scale_config, table_row
from dsmoe.results import PROVENANCE, write_csv
from dsmoe.targets import TABLE1_RUNS as RUNS


def main(argv: list[str] | None = None) -> None:
    args = parse_scale(__doc__, argv)
    sc = scale_config(args.scale)
    evaluate(args.scale, "dsmoe")  # first: it sets the baselines' target
    rows = [table_row(evaluate(args.scale, run), label) for run, label in RUNS if run == "dense" or run in sc.methods]
    columns = list(dict.fromkeys(k for row in rows for k in row if k not in PROVENANCE)) + PROVENANCE
    path = write_csv(results_dir(args.scale) / "table1_ppl.csv", rows, columns)
    for row in rows:
        print(f"{row['Model']:22s} {row['Configuration']:24s} act {row['Activated %']:5.1f}%  PPL {row['PPL']:.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
