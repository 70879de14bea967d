"""Disk plan of a reproduction target: every run with its tokens, steps and files, and the peak disk use.

    python -m dsmoe.plan TARGET --scale S        (./reproduce.sh TARGET --scale S --plan)

Nothing is trained, loaded or downloaded: each run's model is built on the meta device from the dense model's
config (shipped in dsmoe/model_configs/ for the paper's two models), its method applied to that structure (DSMoE
routers, LLaMA-MoE gates, LLM-Pruner's planned shapes; SparseGPT stores a dense model). The files follow the
training loop (dsmoe.train):

- the dense model: downloaded once into the HF cache, in its source dtype (config.json dtype/torch_dtype);
- init_model/: the prepared model in the dtype training holds weights in (fp32; bf16 under bf16-true);
  its weights are deleted when the run finishes;
- checkpoints/: resume checkpoints every trainer.checkpoint_every_n_steps, fp32 weights and AdamW's two moments
  (12 bytes per parameter; 6 under bf16-true), the newest trainer.keep_last_checkpoints kept (one more while
  the newest is written); deleted when the run finishes unless trainer.keep_checkpoints;
- exports/tokens_<N>/ at trainer.export_tokens and final/: weights only, in the export dtype.

Runs execute in order, each file exists from its write to its deletion, and the peak is the largest total over time.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from transformers import AutoModelForCausalLM, PretrainedConfig

from dsmoe.cli import run as run_cli
from dsmoe.experiment import ROOT, run_config, runs_root, scale_arguments, scale_config
from dsmoe.matching import parse_target
from dsmoe.methods import get_method, match_options
from dsmoe.models import EMBEDDED_ALIASES, SHIPPED_CONFIGS, model_config
from dsmoe.stats import count_params
from dsmoe.targets import DENSE, TARGETS, runs_in_order, target_labels
from dsmoe.train import export_dtype, resolved_precision, weights_dtype

GB = 1e9
# Table 1: activated params of DSMoE / total, the baselines' target until this scale's DSMoE has been evaluated
PAPER_ACTIVATED = {"meta-llama/Llama-3.2-1B": (735e6, 1.24e9), "meta-llama/Llama-2-7b-hf": (3.93e9, 6.74e9)}


# ---------------------------------------------------------------------------------------------- model structure


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """The dense model's structure on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class Structure:
    """The prepared model of a run: its parameters (all trained, all saved) and the method's matched setting."""

    params: int
    setting: str
    note: str = ""


def prepared_structure(cfg: DictConfig, config: PretrainedConfig, dsmoe_fraction: float) -> Structure:
    """What dsmoe.train's prepare_model would produce, built on the meta device: match_activated resolved as
    ``prepare_model`` does ("dsmoe" → ``dsmoe_fraction``), then the method applied to the structure."""
    method = get_method(cfg.method)
    options = OmegaConf.to_container(cfg.method_options)
    target = parse_target(options.pop("match_activated", None), dsmoe_fraction)
    dense = meta_model(copy.deepcopy(config))  # methods may change the config (LLM-Pruner's untying)
    note = ""
    if target is not None:
        match = match_options(method.name, dense, target, options)
        options, note = {**options, **match.options}, match.note
    params, setting = method.planned_structure(dense, options)
    return Structure(params, setting, note)


# ---------------------------------------------------------------------------------------------- training files


def source_dtype(config) -> torch.dtype:
    """The dtype the dense checkpoint was stored in (config.json dtype / torch_dtype), fp32 if not recorded."""
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    saved = getattr(torch, saved) if isinstance(saved, str) else saved
    return saved if isinstance(saved, torch.dtype) else torch.float32


def fewest_devices(devices: Any) -> int:
    """Devices per node as configured (2, "2", "0,1", [0, 1]); 1 where the machine decides ("auto", -1)."""
    if isinstance(devices, (list, ListConfig)):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    try:
        return max(int(devices), 1)
    except (TypeError, ValueError):
        return 1


def planned_steps(cfg: DictConfig) -> int:
    """Optimizer steps (dsmoe.train.schedule: ceil(max_tokens / (global batch × seq_len))), independent of the
    number of devices, which need not exist on the machine that plans. schedule's checks run as training runs them,
    on the configured devices per node (one where the machine decides: a global batch that one such process per node
    cannot divide, no run can)."""
    from dsmoe.train import schedule

    planned = cfg.copy()
    planned.trainer.accelerator, planned.trainer.devices = "cpu", fewest_devices(cfg.trainer.devices)
    return schedule(planned)[0]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class RunPlan:
    """One run's files (sizes in bytes)."""

    run: str
    labels: list[str]
    method: str
    params: int = 0
    setting: str = ""
    note: str = ""
    steps: int = 0
    tokens: int = 0
    tokens_per_step: int = 0
    init_model_bytes: int = 0
    init_dtype: str = ""
    checkpoint_bytes: int = 0
    checkpoint_every: int = 0
    checkpoints_written: int = 0
    checkpoints_kept: int = 0
    keep_checkpoints: bool = False
    precision: str = ""
    exports: list[tuple[float, int]] = field(default_factory=list)  # (token point, step)
    export_bytes: int = 0
    export_dtype: str = ""

    @property
    def trained(self) -> bool:
        return self.run != DENSE

    @property
    def events(self) -> list[tuple[str, int]]:
        """(what happens, bytes added) in order; nothing for the untrained dense model."""
        return disk_events(self) if self.trained else []

    @property
    def final_bytes(self) -> int:
        return self.export_bytes

    @property
    def kept_bytes(self) -> int:
        """What the run leaves on disk."""
        return sum(delta for _, delta in self.events)

    @property
    def peak_bytes(self) -> int:
        """The most the run adds at any moment."""
        return max(_running(self.events), default=0)


def _running(events: list[tuple[str, int]]) -> list[int]:
    return list(accumulate(delta for _, delta in events))


def disk_events(run: RunPlan) -> list[tuple[str, int]]:
    """The run's writes and deletions in order: init_model/, then checkpoints and exports by step (a checkpoint first
    when both fall on one step; the oldest rotated out after the newest is written), final/, then the cleanup.
    A series of checkpoint writes that all find the same files on disk is listed once."""
    events = [(f"{run.run}: init_model/ written", run.init_model_bytes)]
    writes = range(run.checkpoint_every, run.steps + 1, run.checkpoint_every)
    moments = sorted([(s, 0, None) for s in writes] + [(s, 1, point) for point, s in run.exports])
    alive, steady = 0, False
    for step, kind, point in moments:
        if kind == 1:
            events.append((f"{run.run}: exports/tokens_{int(point)}/ written at step {step}", run.export_bytes))
            steady = False
            continue
        if steady:  # the same files as at the previous write: the same total
            continue
        events.append((f"{run.run}: resume checkpoint written at step {step}", run.checkpoint_bytes))
        if alive == run.checkpoints_kept:
            events.append((f"{run.run}: oldest resume checkpoint rotated out", -run.checkpoint_bytes))
            steady = True
        else:
            alive += 1
    events.append((f"{run.run}: final/ written", run.final_bytes))
    if not run.keep_checkpoints:
        cleanup = run.init_model_bytes + alive * run.checkpoint_bytes
        events.append((f"{run.run}: init_model/ weights and checkpoints/ deleted", -cleanup))
    return events


def plan_run(cfg: DictConfig, labels: list[str], config: PretrainedConfig, dsmoe_fraction: float) -> RunPlan:
    """Sizes and disk events of one trained run of the scale."""
    from dsmoe.train import check_values

    t = cfg.trainer
    check_values(cfg)  # what the run itself would refuse, except what needs its machine or files
    steps = planned_steps(cfg)
    structure = prepared_structure(cfg, config, dsmoe_fraction)
    tokens_per_step = t.global_batch_size * int(cfg.data.get("seq_len", 1024))
    precision, dtype, weights = resolved_precision(t), export_dtype(t), weights_dtype(t)
    exports = []
    for point in sorted(t.export_tokens):
        if not 0 < point <= steps * tokens_per_step:
            raise ValueError(
                f"trainer.export_tokens {point!r} is not a token count in "
                f"(0, {steps * tokens_per_step}] (the run's tokens)"
            )
        exports.append((point, math.ceil(point / tokens_per_step)))
    return RunPlan(
        run=cfg.run_name,
        labels=labels,
        method=cfg.method,
        params=structure.params,
        setting=structure.setting,
        note=structure.note,
        steps=steps,
        tokens=steps * tokens_per_step,
        tokens_per_step=tokens_per_step,
        init_model_bytes=structure.params * weights.itemsize,
        init_dtype=dtype_name(weights),
        checkpoint_bytes=structure.params * 3 * weights.itemsize,  # the weights + AdamW's two moments, same dtype
        checkpoint_every=t.checkpoint_every_n_steps,
        checkpoints_written=steps // t.checkpoint_every_n_steps,
        checkpoints_kept=t.keep_last_checkpoints,
        keep_checkpoints=t.keep_checkpoints,
        precision=precision,
        exports=exports,
        export_bytes=structure.params * dtype.itemsize,
        export_dtype=dtype_name(dtype),
    )


# ---------------------------------------------------------------------------------------------- the target


@dataclass
class TargetPlan:
    """Every run of a target in execution order after the dense model's download, and the peak disk use (bytes)."""

    target: str
    scale: str
    model: str
    config_source: str
    dense_params: int
    dense_dtype: str
    dense_bytes: int
    dsmoe_fraction: float
    fraction_source: str
    runs: list[RunPlan]

    def on_disk_before(self) -> list[int]:
        """Bytes on disk when each run starts: the dense model and what the earlier runs left."""
        before, out = self.dense_bytes, []
        for run in self.runs:
            out.append(before)
            before += run.kept_bytes
        return out

    @property
    def peak_bytes(self) -> int:
        return max(
            [self.dense_bytes] + [b + r.peak_bytes for b, r in zip(self.on_disk_before(), self.runs, strict=True)]
        )

    @property
    def peak_event(self) -> str:
        """What happens at the first moment the peak is reached."""
        peak = self.peak_bytes
        for before, run in zip(self.on_disk_before(), self.runs, strict=True):
            for (what, _), total in zip(run.events, _running(run.events), strict=True):
                if before + total == peak:
                    return f"{what} ({gb(before)} on disk before the run: the dense model and earlier runs' files)"
        return f"{self.model} stored"

    def run(self, name: str) -> RunPlan:
        return next(r for r in self.runs if r.run == name)


STRUCTURE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def paper_model(model: str, config: PretrainedConfig) -> str | None:
    """The paper's model ``model`` is: its hub name, or a local copy with its shipped config's structure."""
    if model in PAPER_ACTIVATED:
        return model
    shape = [getattr(config, key, None) for key in STRUCTURE_KEYS]
    for name in PAPER_ACTIVATED:
        if shape == [getattr(model_config(name), key) for key in STRUCTURE_KEYS]:
            return name
    return None


def dsmoe_fraction(scale: str, model: str, config: PretrainedConfig) -> tuple[float, str]:
    """The activated fraction the baselines match: this scale's DSMoE evaluation, else the paper's Table 1."""
    path = runs_root(scale) / "dsmoe" / "eval.json"
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    if path.exists():
        return float(json.loads(path.read_text())["activated_fraction"]), f"measured by this scale's DSMoE ({shown})"
    paper = paper_model(model, config)
    activated, total = PAPER_ACTIVATED[paper or "meta-llama/Llama-3.2-1B"]
    source = f"the paper's Table 1 ({count(activated)} of {count(total)}"
    if paper is None:
        source += f" for Llama-3.2-1B, assumed for {model})"
    else:
        source += ")" if paper == model else f" for {paper}, whose structure {model} has)"
    return activated / total, f"{source}: DSMoE has not been evaluated at this scale yet ({shown} is missing)"


def source_description(model: str) -> tuple[str, bool]:
    """Where the dense model's config comes from, and whether its weights are a copy the suite makes (hub
    download, embedded model's cache) rather than the user's own directory."""
    if model in SHIPPED_CONFIGS:
        return f"shipped config dsmoe/model_configs/{SHIPPED_CONFIGS[model]}", True
    if model in EMBEDDED_ALIASES:
        return "embedded model, converted once into the suite's cache", True
    if Path(model).expanduser().is_dir():
        return f"local directory {model} (already on disk, not counted)", False
    return "config from the local HF cache", True


def plan_target(target: str, scale: str, seeds: int | None = None) -> TargetPlan:
    """The disk plan of ``./reproduce.sh TARGET --scale SCALE --seeds N`` ("all": every target's runs, each once;
    every trained run repeated for each seed, default the scale's eval.seeds)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    sc = scale_config(scale)
    model = sc.base.model
    config = model_config(model)
    dense_dtype = source_dtype(config)
    dense_params = count_params(meta_model(config))
    configs = {run: run_config(scale, run) for run in sc.methods}
    matching = [run for run, cfg in configs.items() if cfg.method_options.get("match_activated") == "dsmoe"]
    order = runs_in_order(target, configs, matching)
    labels: dict[str, list[str]] = {}
    for run, label in target_labels(target):
        if label not in labels.setdefault(run, []):
            labels[run].append(label)
    fraction, fraction_source = dsmoe_fraction(scale, model, config)
    seeds = int(sc.eval.get("seeds", 1)) if seeds is None else seeds
    runs = []
    for run in order:
        try:
            if run == DENSE:
                runs.append(RunPlan(DENSE, labels[DENSE], "dense"))
                continue
            for seed in range(seeds):
                runs.append(plan_run(run_config(scale, run, seed), labels[run], config, fraction))
        except ValueError as err:
            raise ValueError(f"run {run!r} of scale {scale!r}: {err}") from err
    config_source, counted = source_description(model)
    return TargetPlan(
        target=target,
        scale=scale,
        model=model,
        config_source=config_source,
        dense_params=dense_params,
        dense_dtype=dtype_name(dense_dtype),
        dense_bytes=dense_params * dense_dtype.itemsize if counted else 0,
        dsmoe_fraction=fraction,
        fraction_source=fraction_source if any(run in matching for run in order) else "",
        runs=runs,
    )


# ---------------------------------------------------------------------------------------------- output


def gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def describe_run(run: RunPlan, before: int) -> list[str]:
    """A run's files; ``before``: the bytes on disk when it starts."""
    head = f"{run.run}  [{'; '.join(run.labels)}]"
    if not run.trained:
        return [head, f"  no training: evaluates the dense model; disk: {gb(before)}"]
    kept = run.checkpoints_kept
    end = "kept at the end" if run.keep_checkpoints else "deleted when the run finishes"
    lines = [
        f"{head}  method {run.method}: {run.setting}",
        f"  {count(run.params)} params ({run.params:,}); {count(run.tokens)} tokens = {run.steps:,} steps × "
        f"{run.tokens_per_step:,} tokens; {run.precision}",
        f"  init_model/   {gb(run.init_model_bytes)} {run.init_dtype}, weights {end}",
        f"  checkpoints/  {gb(run.checkpoint_bytes)} each (weights + AdamW moments), every {run.checkpoint_every:,} "
        f"steps: {run.checkpoints_written} written, newest {kept} kept ({kept + 1} while writing), {end}",
    ]
    if run.exports:
        points = ", ".join(f"{count(point)} (step {step:,})" for point, step in run.exports)
        lines.append(f"  exports/      {len(run.exports)} × {gb(run.export_bytes)} {run.export_dtype} at {points}")
    lines.append(f"  final/        {gb(run.final_bytes)} {run.export_dtype}")
    if run.note:
        lines.append(f"  note: {run.note}")
    lines.append(
        f"  disk: {gb(before)} before, up to {gb(before + run.peak_bytes)} during the run, {gb(run.kept_bytes)} left by it"
    )
    return lines


def format_plan(plan: TargetPlan) -> str:
    """The plan as text; its last line is ``peak disk: N GB``."""
    lines = [
        f"Disk plan: {plan.target} at scale {plan.scale} (nothing trained, loaded or downloaded)",
        f"Model: {plan.model}, {count(plan.dense_params)} params ({plan.dense_params:,}), {plan.dense_dtype}; "
        f"{plan.config_source}",
        f"  dense weights: {gb(plan.dense_bytes)} (hub models: downloaded once into the HF cache)",
    ]
    if plan.fraction_source:
        lines.append(
            f"Baselines match DSMoE's activated fraction {100 * plan.dsmoe_fraction:.1f}%: {plan.fraction_source}"
        )
    lines.append("Runs in the order they execute (GB = 1e9 bytes):")
    for run, before in zip(plan.runs, plan.on_disk_before(), strict=True):
        lines += describe_run(run, before)
    lines += [
        "Not counted: training data (streamed from the hub, or local copies you made), benchmark datasets, TensorBoard logs, evaluation JSON (kB).",
        f"Peak at: {plan.peak_event}",
        f"peak disk: {plan.peak_bytes / GB:.1f} GB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> TargetPlan:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help=f"one of {list(TARGETS)}")
    parser.add_argument("--scale", default="demo", help="a scale of experiments/configs/scales/ (default: demo)")
    parser.add_argument("--limit", type=int, default=None, help="accepted as the targets take it; no effect on disk")
    parser.add_argument(
        "--seeds", type=int, default=None, help="repetitions of every trained run (default: the scale's)"
    )
    args = scale_arguments(parser.parse_args(argv))  # --scale, --limit and --seeds as the targets check them
    plan = plan_target(args.target, args.scale, args.seeds)
    print(format_plan(plan))
    return plan


if __name__ == "__main__":
    run_cli(main)
