"""Fig. 2: DSMoE trained without the piecewise G(x) (soft σ weights, eq. 20), then thresholded at
inference with τ swept on the validation set in steps of 0.05, against the DSMoE point.

    python experiments/ablation_no_gate.py [--scale demo]   → results/<scale>/fig2_no_gate.csv, .png
"""

from dsmoe.cli import run as run_cli
from dsmoe.experiment import evaluate, parse_scale, results_dir, run_config
from dsmoe.plots import fig2_curve
from dsmoe.results import PROVENANCE, write_csv

TAUS = [round(0.05 * k, 2) for k in range(1, 20)]


def main(argv: list[str] | None = None) -> None:
    args = parse_scale(__doc__, argv)
    rows = []
    for tau in TAUS:
        r = evaluate(args.scale, "dsmoe_no_gate", tau=tau)
        rows.append(
            {"run": "w/o G(x)", "tau": tau, "mean active experts": r["mean_active"], "PPL": r["ppl"], **r["provenance"]}
        )
        print(f"τ={tau:.2f}  active {r['mean_active']:.2f}  PPL {r['ppl']:.3f}")
    d = evaluate(args.scale, "dsmoe")
    rows.append(
        {"run": "DSMoE", "tau": d["tau"], "mean active experts": d["mean_active"], "PPL": d["ppl"], **d["provenance"]}
    )
    columns = ["run", "tau", "mean active experts", "PPL", *[c for c in PROVENANCE if c != "tau"]]
    print(f"wrote {write_csv(results_dir(args.scale) / 'fig2_no_gate.csv', rows, columns)}")
    model = run_config(args.scale, "dsmoe").model
    points = [(r["tau"], r["mean active experts"], r["PPL"]) for r in rows[:-1]]
    caption = f"{model}, {args.scale} scale: trained w/o G(x), thresholded at inference"
    print(
        f"wrote {fig2_curve(points, (d['mean_active'], d['ppl']), caption, results_dir(args.scale) / 'fig2_no_gate.png')}"
    )


if __name__ == "__main__":
    run_cli(main)
