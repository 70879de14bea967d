"""Fig. 3: mean active experts per layer on each validation source (layers × sources heatmap).

python experiments/heatmap.py [--scale demo]   → results/<scale>/fig3_heatmap.csv, .png
"""

from dsmoe.cli import run as run_cli
from dsmoe.experiment import evaluate, parse_scale, results_dir, run_config
from dsmoe.plots import fig3_heatmap
from dsmoe.results import PROVENANCE, write_csv


def main(argv: list[str] | None = None) -> None:
    args = parse_scale(__doc__, argv)
    r = evaluate(args.scale, "dsmoe")
    active = r["active_per_layer"]
    rows = [
        {"source": s, **{f"layer_{i:02d}": a for i, a in enumerate(v)}, "mean": sum(v) / len(v), **r["provenance"]}
        for s, v in active.items()
    ]
    layers = [f"layer_{i:02d}" for i in range(len(next(iter(active.values()))))]
    print(
        f"wrote {write_csv(results_dir(args.scale) / 'fig3_heatmap.csv', rows, ['source', *layers, 'mean', *PROVENANCE])}"
    )
    cfg = run_config(args.scale, "dsmoe")
    n = cfg.method_options.num_experts
    caption = f"DSMoE {cfg.model}, {args.scale} scale: mean active experts (of {n}) per layer and source"
    print(f"wrote {fig3_heatmap(active, n, caption, results_dir(args.scale) / 'fig3_heatmap.png')}")


if __name__ == "__main__":
    run_cli(main)
