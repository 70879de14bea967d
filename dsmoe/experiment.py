"""Shared plumbing of the experiment scripts: scale configs, train-if-missing runs, cached evaluations.

A *scale* (experiments/configs/scales/<scale>.yaml) holds one base training config and one override
block per method. ``ensure_run`` trains a method at a scale unless its final model already exists,
so re-running a target skips finished runs; ``evaluate_run`` caches its JSON next to the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dsmoe.train import load_config, train

ROOT = Path(__file__).resolve().parent.parent
SCALES_DIR = ROOT / "experiments" / "configs" / "scales"
SCALES = ("demo", "smollm2", "llama1b", "llama7b")
RESULTS = ROOT / "results"


def scale_config(scale: str) -> DictConfig:
    """The scale's YAML: {base: <train config>, methods: {run: overrides}, eval: {...}}."""
    path = SCALES_DIR / f"{scale}.yaml"
    if scale not in SCALES or not path.exists():
        raise ValueError(f"unknown scale {scale!r}; choose one of {SCALES}")
    return OmegaConf.load(path)


def run_config(scale: str, run: str, extra: dict[str, Any] | None = None) -> DictConfig:
    """Train config of one run: scale base ← the run's method block ← extra overrides."""
    sc = scale_config(scale)
    if run not in sc.methods:
        raise ValueError(f"scale {scale!r} has no run {run!r}; available: {sorted(sc.methods)}")
    cfg = load_config(None)
    cfg = OmegaConf.merge(cfg, sc.base, sc.methods[run], extra or {})
    cfg.run_name = run
    cfg.out_dir = str(Path(os.environ.get("DSMOE_RUNS", ROOT / "runs")) / scale)
    return cfg


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.out_dir) / cfg.run_name


def is_finished(cfg: DictConfig) -> bool:
    return (run_dir(cfg) / "train_summary.json").exists() and (run_dir(cfg) / "final" / "config.json").exists()


def ensure_run(cfg: DictConfig) -> Path:
    """Train unless finished; an interrupted run resumes from its last checkpoint. Returns the run dir."""
    if is_finished(cfg):
        print(f"[experiment] {cfg.run_name}: finished run found in {run_dir(cfg)}, skipping training")
        return run_dir(cfg)
    cfg.resume = "last"
    train(cfg)
    return run_dir(cfg)


def cached(path: Path, compute) -> Any:
    """Return the JSON at path, or compute it, write it atomically and return it."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)
    return value


def train_summary(rd: Path) -> dict[str, Any]:
    return json.loads((rd / "train_summary.json").read_text())
