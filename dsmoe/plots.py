"""The one plotting module: Fig. 2 (PPL vs active experts), Fig. 3 (layer × source heatmap), token curves."""

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


def fig2_curve(points: list[tuple[float, float, float]], dsmoe_point: tuple[float, float], caption: str, path) -> Path:
    """points: (τ, mean active experts, PPL) of the model trained without G(x); dsmoe_point: (active, PPL)."""
    points = sorted(points, key=lambda p: p[1])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([p[1] for p in points], [p[2] for p in points], "o-", label="w/o G(x) (eq. 20), τ swept")
    for tau, active, ppl in points[:: max(len(points) // 6, 1)]:
        ax.annotate(f"τ={tau:.2f}", (active, ppl), fontsize=7, textcoords="offset points", xytext=(4, 4))
    ax.plot(*dsmoe_point, "*", markersize=16, color="tab:red", label="DSMoE (τ=0.5)")
    ax.set_xlabel("mean activated experts per layer")
    ax.set_ylabel("validation PPL")
    ax.set_yscale("log")
    ax.set_title(caption, fontsize=8)
    ax.legend(fontsize=8)
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


def token_curve(tokens: list[float], ppl: list[float], caption: str, path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(tokens, ppl, "o-")
    ax.set_xlabel("continued pre-training tokens")
    ax.set_ylabel("validation PPL")
    ax.set_title(caption, fontsize=8)
    return _save(fig, path)
