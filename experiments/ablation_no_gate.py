"""Fig. 2: DSMoE trained without the piecewise G(x) (soft σ weights, eq. 20), then thresholded at
inference with τ swept on the validation set in steps of 0.05, against the DSMoE point.

    python experiments/ablation_no_gate.py [--scale demo] [--seeds N]   → results/<scale>/fig2_no_gate.csv, .png

The no-G(x) model trains without the n/#active rescale of eq. 8. Thresholding it *with* the rescale amplifies the
experts that remain, which can move its curve, so the curve is reported both ways: with eq. 8's rescale (as DSMoE
evaluates) and without it (as the model trained). Points are means over the seeds, with their sd.
"""

from dsmoe.cli import run as run_cli
from dsmoe.experiment import evaluate, parse_scale, plus_minus, results_dir, run_config, seeds_provenance, with_spread
from dsmoe.plots import fig2_curve
from dsmoe.results import PROVENANCE, write_csv

TAUS = [round(0.05 * k, 2) for k in range(1, 20)]
CURVES = {True: "w/o G(x), thresholded with n/#active", False: "w/o G(x), thresholded, no rescale"}


def row(run: str, results: list[dict], rescale: bool | str) -> dict:
    out = {"run": run, "rescale": rescale, "tau": results[0]["tau"]}
    with_spread(out, "mean active experts", [r["mean_active"] for r in results])
    with_spread(out, "PPL", [r["ppl"] for r in results])
    return {**out, "seeds": len(results), **seeds_provenance(results), "tau": results[0]["tau"]}


def main(argv: list[str] | None = None) -> None:
    args = parse_scale(__doc__, argv)
    seeds = range(args.seeds)
    rows = []
    for rescale, label in CURVES.items():
        for tau in TAUS:
            results = [evaluate(args.scale, "dsmoe_no_gate", tau=tau, rescale=rescale, seed=s) for s in seeds]
            rows.append(row("w/o G(x)", results, rescale))
            r = rows[-1]
            print(
                f"{label}: τ={tau:.2f}  active {r['mean active experts']:.2f}  PPL {plus_minus(r['PPL'], r['PPL sd'])}"
            )
    rows.append(row("DSMoE", [evaluate(args.scale, "dsmoe", seed=s) for s in seeds], True))
    columns = ["run", "rescale", "tau", "mean active experts", "mean active experts sd", "PPL", "PPL sd", "seeds"]
    columns += [c for c in PROVENANCE if c != "tau"]
    print(f"wrote {write_csv(results_dir(args.scale) / 'fig2_no_gate.csv', rows, columns)}")
    model = run_config(args.scale, "dsmoe").model
    curves = {
        label: [(r["tau"], r["mean active experts"], r["PPL"], r["PPL sd"]) for r in rows if r["rescale"] is rescale]
        for rescale, label in CURVES.items()
    }
    d = rows[-1]
    caption = f"{model}, {args.scale} scale, {args.seeds} seed(s): trained w/o G(x), thresholded at inference"
    path = results_dir(args.scale) / "fig2_no_gate.png"
    print(f"wrote {fig2_curve(curves, (d['mean active experts'], d['PPL'], d['PPL sd']), caption, path)}")


if __name__ == "__main__":
    run_cli(main)
