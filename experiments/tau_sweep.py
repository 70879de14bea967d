"""Table 4 (appendix A): the trained DSMoE model re-thresholded at τ = 0.2 … 0.8 after training.

    python experiments/tau_sweep.py [--scale demo] [--seeds N]   → results/<scale>/table4_tau.csv

τ is an inference-time knob here (the model trained at τ=0.5 is evaluated at each τ); PPL and the
activated-parameter percentage are measured on the validation windows (mean and sd over the seeds).
"""

from dsmoe.cli import run as run_cli
from dsmoe.experiment import evaluate, parse_scale, plus_minus, results_dir, seeds_provenance, with_spread
from dsmoe.results import PROVENANCE, write_csv

TAUS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def main(argv: list[str] | None = None) -> None:
    args = parse_scale(__doc__, argv)
    rows = []
    for tau in TAUS:
        results = [evaluate(args.scale, "dsmoe", tau=tau, seed=s) for s in range(args.seeds)]
        row = {"tau": tau}
        with_spread(row, "PPL", [r["ppl"] for r in results])
        # of the DSMoE model's own parameters, as Table 4
        with_spread(row, "activated params %", [100 * r["activated_params"] / r["params"] for r in results])
        rows.append({**row, "seeds": len(results), **seeds_provenance(results), "tau": tau})
        print(f"τ={tau:.1f}  PPL {plus_minus(row['PPL'], row['PPL sd'])}  activated {row['activated params %']:.2f}%")
    columns = ["tau", "PPL", "PPL sd", "activated params %", "activated params % sd", "seeds"]
    columns += [c for c in PROVENANCE if c != "tau"]
    print(f"wrote {write_csv(results_dir(args.scale) / 'table4_tau.csv', rows, columns)}")


if __name__ == "__main__":
    run_cli(main)
