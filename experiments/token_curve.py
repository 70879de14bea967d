"""Tables 5/6 (appendix B): DSMoE validation PPL by continued pre-training tokens.

    python experiments/token_curve.py [--scale demo] [--seeds N]   → results/<scale>/tables5_6_tokens.csv (+ .png)

The DSMoE run writes weights-only exports when it passes each of its ``trainer.export_tokens`` points (the paper's
token points at the llama1b / llama7b scales); each export, and the final model, is evaluated like the final model.
Rows are means over the seeds, with their sd.
"""

from dsmoe.cli import run as run_cli
from dsmoe.experiment import (
    ensure_run,
    evaluate,
    parse_scale,
    plus_minus,
    results_dir,
    run_config,
    run_dir,
    seeds_provenance,
    with_spread,
)
from dsmoe.packages import read_json
from dsmoe.plots import token_curve
from dsmoe.results import PROVENANCE, write_csv


def evaluations(scale: str, seed: int) -> dict[int, tuple[int, dict]]:
    """tokens → (steps, evaluation) for each complete export of the seed's DSMoE run and its final model."""
    ensure_run(scale, "dsmoe", seed)
    rd = run_dir(run_config(scale, "dsmoe", seed))
    points = {}
    for info_file in (rd / "exports").glob("tokens_*/export_info.json"):
        if (info_file.parent / "config.json").exists():  # complete exports only
            info = read_json(info_file)
            r = evaluate(scale, "dsmoe", model_dir=info_file.parent, tag=f"_step{info['step']}", seed=seed)
            points[info["tokens"]] = (info["step"], r)
    summary = read_json(rd / "train_summary.json")
    points[summary["tokens"]] = (summary["global_step"], evaluate(scale, "dsmoe", seed=seed))
    return points


def main(argv: list[str] | None = None) -> None:
    args = parse_scale(__doc__, argv)
    per_seed = [evaluations(args.scale, s) for s in range(args.seeds)]
    rows = []
    for tokens in sorted(set.intersection(*(set(p) for p in per_seed))):
        steps, results = per_seed[0][tokens][0], [p[tokens][1] for p in per_seed]
        row = {"Tokens": tokens}
        with_spread(row, "PPL", [r["ppl"] for r in results])
        with_spread(row, "activated params %", [100 * r["activated_fraction"] for r in results])
        rows.append({**row, "seeds": len(results), **seeds_provenance(results), "tokens": tokens, "steps": steps})
        print(f"step {steps:6d}  tokens {tokens:.3g}  PPL {plus_minus(row['PPL'], row['PPL sd'])}")
    columns = ["Tokens", "PPL", "PPL sd", "activated params %", "activated params % sd", "seeds", *PROVENANCE]
    print(f"wrote {write_csv(results_dir(args.scale) / 'tables5_6_tokens.csv', rows, columns)}")
    caption = f"DSMoE ({run_config(args.scale, 'dsmoe').model}), PPL by continued pre-training tokens"
    path = results_dir(args.scale) / "tables5_6_tokens.png"
    tokens, ppl, sd = ([r[k] for r in rows] for k in ("Tokens", "PPL", "PPL sd"))
    print(f"wrote {token_curve(tokens, ppl, caption, path, sd=sd)}")


if __name__ == "__main__":
    run_cli(main)
