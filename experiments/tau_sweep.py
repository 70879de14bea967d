"""Table 4 (appendix A): the trained DSMoE model re-thresholded at τ = 0.2 … 0.8 after training.

    python experiments/tau_sweep.py [--scale demo]   → results/<scale>/table4_tau.csv

τ is an inference-time knob here (the model trained at τ=0.5 is evaluated at each τ); PPL and the
activated-parameter percentage are measured on the validation windows.
"""

from dsmoe.cli import run as run_cli
from dsmoe.experiment import evaluate, parse_scale, results_dir
from dsmoe.results import PROVENANCE, write_csv

TAUS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def main(argv: list[str] | None = None) -> None:
    args = parse_scale(__doc__, argv)
    rows = []
    for tau in TAUS:
        r = evaluate(args.scale, "dsmoe", tau=tau)
        share = 100 * r["activated_params"] / r["params"]  # of the DSMoE model's own parameters, as Table 4
        rows.append({"tau": tau, "PPL": r["ppl"], "activated params %": share, **r["provenance"]})
        print(f"τ={tau:.1f}  PPL {r['ppl']:.3f}  activated {share:.2f}%")
    columns = ["tau", "PPL", "activated params %", *[c for c in PROVENANCE if c != "tau"]]
    print(f"wrote {write_csv(results_dir(args.scale) / 'table4_tau.csv', rows, columns)}")


if __name__ == "__main__":
    run_cli(main)
