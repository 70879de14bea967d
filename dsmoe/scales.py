"""Scale files (experiments/configs/scales/<scale>.yaml), checked against a typed schema when a scale is loaded.

A scale holds one base training config (``base``), one override block per run (``methods``) and the evaluation
settings (``eval``). ``base`` and each run merged over it (as the run is configured) are checked against the
training config's schema (:class:`dsmoe.train.TrainConfig`; its ``data`` against :class:`dsmoe.data.DataConfig`;
``method_options`` are left to the method), ``eval`` against :class:`EvalConfig` and its values' ranges (before any
run trains). An unknown key is an error naming the key and the allowed ones, a bad value one naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dsmoe.config_checks import reject_unknown_keys
from dsmoe.config_merge import merged
from dsmoe.data import DataConfig
from dsmoe.targets import DENSE, TARGET_RUNS
from dsmoe.train import TrainConfig, read_yaml

PROTOCOLS = ("windows", "documents")  # EvalConfig.protocol


@dataclass
class EvalConfig:
    """How the experiment drivers evaluate a scale's runs."""

    batch_size: int  # sequences per batch of validation PPL and of the Table 2 benchmarks
    max_gen_toks: int  # generation length of the generative Table 2 tasks
    benchmark_limit: int | None = None  # items per Table 2 task; None: the full sets (--limit overrides it)
    protocol: str = "windows"  # validation PPL: "windows" (packed held-out documents) or "documents" (paper §5.1)
    seeds: int = 1  # repetitions of every trained run (--seeds overrides it)
    val_windows: int | None = None  # held-out windows per source under the "windows" protocol; None: all


@dataclass
class ScaleConfig:
    """A scale: the base training config, the runs' overrides of it and the evaluation settings."""

    base: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    eval: EvalConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_data(data: DictConfig, where: str) -> None:
    """``data`` makes a :class:`DataConfig` (known keys, valid sources and settings; no file is read)."""
    try:
        DataConfig.from_dict(OmegaConf.to_container(data))
    except ValueError as error:
        raise ValueError(f"{where}.data: {error}") from error


def check_eval(evaluation: EvalConfig, where: str) -> None:
    """Every ``eval`` value in its range; a bad one is an error naming ``where``, the key, the value and what is
    allowed."""
    for key in ("batch_size", "max_gen_toks", "seeds", "val_windows", "benchmark_limit"):
        value, optional = getattr(evaluation, key), key in ("val_windows", "benchmark_limit")
        if value is not None and value < 1:  # None only where optional (the schema's types are checked first)
            allowed = "null (all) or an integer >= 1" if optional else "an integer >= 1"
            raise ValueError(f"{where} eval.{key} is {value!r}; allowed: {allowed}")
    if evaluation.protocol not in PROTOCOLS:
        raise ValueError(f"{where} eval.protocol is {evaluation.protocol!r}; choose one of {list(PROTOCOLS)}")


def known_runs() -> set[str]:
    """The run names the targets read from a scale's ``methods`` (dsmoe.targets)."""
    return {run for runs in TARGET_RUNS.values() for run, _ in runs} - {DENSE}


def load_scale(path: str | Path) -> ScaleConfig:
    """The scale at ``path``, every key checked (see the module docstring); ``eval`` with its defaults filled in."""
    name = Path(path).stem
    where = f"scale {name!r}"
    raw = OmegaConf.to_container(read_yaml(lambda: OmegaConf.load(path), f"{where} ({path})"))
    sections = {f.name for f in dataclasses.fields(ScaleConfig)}
    if not isinstance(raw, dict):
        raise ValueError(f"{where} ({path}) must be a mapping of {sorted(sections)}")
    reject_unknown_keys(raw, sections, "key(s)", f" in {where}")
    for section in sorted(sections):
        if not isinstance(raw.get(section), dict):
            raise ValueError(f"{where}: {section} must be a mapping, got {raw.get(section)!r}")

    # a run no target reads (a misspelled name) would be left out of the tables without a word
    reject_unknown_keys(raw["methods"], known_runs(), "run(s)", f" in {where} methods")
    base = merged(TrainConfig, raw["base"], schema=TrainConfig, where=f"{where} base")
    check_data(base.data, f"{where} base")
    for run, overrides in raw["methods"].items():  # each run as it is configured: defaults <- base <- its block
        run_where = f"{where} methods.{run}"
        if not isinstance(overrides, dict):
            raise ValueError(f"{run_where} must be a mapping of train config keys, got {overrides!r}")
        config = merged(base, overrides, schema=TrainConfig, where=run_where)
        if "data" in overrides:
            check_data(config.data, run_where)

    evaluation = merged(EvalConfig, raw["eval"], schema=EvalConfig, where=f"{where} eval")
    missing = sorted(OmegaConf.missing_keys(evaluation))
    if missing:
        raise ValueError(f"{where} eval has no {missing}: give them (see dsmoe.scales.EvalConfig)")
    evaluation = OmegaConf.to_object(evaluation)
    check_eval(evaluation, where)
    return ScaleConfig(base=raw["base"], methods=raw["methods"], eval=evaluation)
