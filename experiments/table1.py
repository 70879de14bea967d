"""Table 1: perplexity of the dense model, DSMoE and the baselines at matched activated parameters.

    python experiments/table1.py [--scale demo|smollm2|llama1b|llama7b] [--seeds N]   → results/<scale>/table1_ppl.csv

DSMoE trains first; its activated-parameter fraction, measured on the validation set, is the target
every baseline matches (SparseGPT sparsity, LLaMA-MoE k, LLM-Pruner widths), seed by seed. All runs use the same
data, steps and optimizer settings. Each trained row is the mean over the seeds, with its sd.
"""

from dsmoe.cli import run as run_cli
from dsmoe.experiment import (
    defined_runs,
    evaluate,
    evaluate_dsmoe_first,
    parse_scale,
    plus_minus,
    results_dir,
    table_row,
)
from dsmoe.results import PROVENANCE, write_csv
from dsmoe.targets import DENSE, TABLE1_RUNS


def main(argv: list[str] | None = None) -> None:
    args = parse_scale(__doc__, argv)
    seeds = range(args.seeds)
    evaluate_dsmoe_first(args.scale, args.seeds)
    rows = [
        table_row([evaluate(args.scale, run, seed=s) for s in (seeds if run != DENSE else [0])], label)
        for run, label in defined_runs(args.scale, TABLE1_RUNS)
    ]
    columns = list(dict.fromkeys(k for row in rows for k in row if k not in PROVENANCE)) + PROVENANCE
    path = write_csv(results_dir(args.scale) / "table1_ppl.csv", rows, columns)
    for row in rows:
        print(
            f"{row['Model']:22s} {row['Configuration']:24s} act {row['Activated %']:5.1f}%  "
            f"PPL {plus_minus(row['PPL'], row['PPL sd'], 2)} ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''})"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(main)
