"""Fig. 3: mean active experts per layer on each validation source (layers × sources heatmap).

python experiments/heatmap.py [--scale demo] [--seeds N]   → results/<scale>/fig3_heatmap.csv, .png

Each cell is the mean over the seeds; the CSV also holds each cell's sd across seeds (rows "<source> sd").
"""

from dsmoe.cli import run as run_cli
from dsmoe.experiment import evaluate, mean_sd, parse_scale, results_dir, run_config, seeds_provenance
from dsmoe.plots import fig3_heatmap
from dsmoe.results import PROVENANCE, write_csv


def main(argv: list[str] | None = None) -> None:
    args = parse_scale(__doc__, argv)
    results = [evaluate(args.scale, "dsmoe", seed=s) for s in range(args.seeds)]
    sources = list(results[0]["active_per_layer"])
    layers = len(results[0]["active_per_layer"][sources[0]])
    mean, sd = {}, {}
    for source in sources:
        cells = [mean_sd([r["active_per_layer"][source][i] for r in results]) for i in range(layers)]
        mean[source], sd[source] = [m for m, _ in cells], [s for _, s in cells]
    names = [f"layer_{i:02d}" for i in range(layers)]
    prov = {**seeds_provenance(results), "seeds": len(results)}
    rows = [
        {"source": s, **dict(zip(names, mean[s], strict=True)), "mean": sum(mean[s]) / layers, **prov} for s in sources
    ]
    rows += [{"source": f"{s} sd", **dict(zip(names, sd[s], strict=True)), **prov} for s in sources]
    columns = ["source", *names, "mean", "seeds", *PROVENANCE]
    print(f"wrote {write_csv(results_dir(args.scale) / 'fig3_heatmap.csv', rows, columns)}")
    cfg = run_config(args.scale, "dsmoe")
    n = cfg.method_options.num_experts
    caption = (
        f"DSMoE {cfg.model}, {args.scale} scale: mean active experts (of {n}) per layer and source, "
        f"mean of {len(results)} seed(s)"
    )
    print(f"wrote {fig3_heatmap(mean, n, caption, results_dir(args.scale) / 'fig3_heatmap.png')}")


if __name__ == "__main__":
    run_cli(main)
