"""The one plotting module: Fig. 2 (PPL vs active experts), Fig. 3 (layer × source heatmap), token curves,
inference speedup curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dsmoe.packages import write_atomic  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    """Write atomically (dsmoe.packages.write_atomic)."""
    try:
        return write_atomic(
            path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix[1:], dpi=150, bbox_inches="tight")
        )
    finally:
        plt.close(fig)


def fig2_curve(
    curves: dict[str, list[tuple[float, float, float, float]]],
    dsmoe_point: tuple[float, float, float],
    caption: str,
    path,
) -> Path:
    """curves: label → points (τ, mean active experts, PPL, PPL sd over seeds) of the model trained without G(x),
    thresholded at τ; dsmoe_point: (active, PPL, PPL sd) of DSMoE."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, points in curves.items():
        points = sorted(points, key=lambda p: p[1])
        line = ax.errorbar(
            [p[1] for p in points],
            [p[2] for p in points],
            yerr=[p[3] for p in points],
            fmt="o-",
            markersize=3,
            capsize=2,
            label=label,
        )
        for tau, active, ppl, _ in points[:: max(len(points) // 6, 1)]:
            ax.annotate(
                f"τ={tau:.2f}",
                (active, ppl),
                fontsize=6,
                textcoords="offset points",
                xytext=(4, 4),
                color=line[0].get_color(),
            )
    active, ppl, sd = dsmoe_point
    ax.errorbar([active], [ppl], yerr=[sd], fmt="*", markersize=16, color="tab:red", label="DSMoE (τ=0.5)")
    ax.set_xlabel("mean activated experts per layer")
    ax.set_ylabel("validation PPL")
    ax.set_yscale("log")
    ax.set_title(caption, fontsize=8)
    ax.legend(fontsize=7)
    return _save(fig, path)


def fig3_heatmap(active: dict[str, list[float]], num_experts: int, caption: str, path) -> Path:
    """active: source → mean active experts per layer (rows: sources, columns: layers)."""
    sources = list(active)
    layers = len(next(iter(active.values())))
    fig, ax = plt.subplots(figsize=(max(6, layers * 0.3), 1.0 + 0.5 * len(sources)))
    im = ax.imshow([active[s] for s in sources], aspect="auto", cmap="viridis", vmin=0, vmax=num_experts)
    ax.set_yticks(range(len(sources)), sources)
    ax.set_xticks(range(layers), [str(i) for i in range(layers)], fontsize=6)
    ax.set_xlabel("layer")
    ax.set_title(caption, fontsize=8)
    fig.colorbar(im, ax=ax, label="mean active experts")
    return _save(fig, path)


def token_curve(tokens: list[float], ppl: list[float], caption: str, path, sd: list[float] | None = None) -> Path:
    """PPL by tokens seen; ``sd``: its spread over seeds (error bars)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(tokens, ppl, yerr=sd, fmt="o-", capsize=2)
    ax.set_xlabel("continued pre-training tokens")
    ax.set_ylabel("validation PPL")
    ax.set_title(caption, fontsize=8)
    return _save(fig, path)


def inference_speedup(
    panels: dict[str, dict[str, list[tuple[float, float, float]]]], caption: str, path: str | Path
) -> Path:
    """panels: title → series label → points (active fraction k/n, measured speedup over dense, ideal speedup);
    measured solid, ideal dotted in the same colour, 1× (no speedup) grey."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items(), strict=True):
        for label, points in series.items():
            fraction = [p[0] for p in points]
            (line,) = ax.plot(fraction, [p[1] for p in points], "o-", label=label)
            ax.plot(fraction, [p[2] for p in points], ":", color=line.get_color())
        ax.axhline(1, color="gray", lw=0.8)
        ax.set(xlabel="active fraction k/n", ylabel="speedup over dense", title=f"{title} (dotted: ideal)")
        if series:
            ax.legend(fontsize=7)
    fig.suptitle(caption, fontsize=8)
    return _save(fig, path)
