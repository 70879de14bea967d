"""Continued pre-training entry point: config → model → method → Trainer.fit.

    python -m dsmoe.train --config experiments/configs/demo_smollm2_cpu.yaml [key=value ...]

The YAML is merged over the structured defaults below (an unknown key is an error naming it), then
the dot-list overrides. Every method (DSMoE and its variants, top-k MoE, pruners) goes through the
same LightningModule and DataModule.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from dsmoe.lit import LitCausalLM, OptimConfig
from dsmoe.methods import get_method
from dsmoe.models import EMBEDDED, load_model, load_tokenizer
from dsmoe.packages import write_json
from dsmoe.stats import count_params


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    activation_checkpointing: bool = False
    global_batch_size: int = 32  # sequences per optimizer step (paper: 32)
    micro_batch_size: int = 4
    max_tokens: float = 0  # tokens to train on; max_steps is derived from it (paper: 10B)
    max_steps: int = -1  # only when max_tokens is 0
    gradient_clip_val: float = 1.0
    val_check_interval: int = 100  # optimizer steps between validations
    limit_val_batches: Any = 1.0  # int: batches per source; float: fraction
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 100  # resume checkpoints (weights + optimizer state)
    keep_last_checkpoints: int = 2  # resume checkpoints are rotated: only the newest N are kept
    keep_checkpoints: bool = False  # True: keep checkpoints/ once final/ is written (False saves disk)
    export_tokens: list = field(default_factory=list)  # tokens seen at which weights-only HF exports are written
    export_dtype: str = "auto"  # final/ and exports: auto = bfloat16/float16 under bf16/16 precision, else float32
    seed: int = 1234
    deterministic: bool = False


@dataclass
class TrainConfig:
    run_name: str = MISSING
    out_dir: str = "runs"
    model: str = EMBEDDED
    method: str = "dsmoe"
    method_options: dict = field(default_factory=dict)
    calibration_batches: int = 8  # for methods that need calibration data (pruners)
    data: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    resume: str | None = None  # null | last | path to a .ckpt


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Structured defaults ← YAML ← dot-list overrides; unknown keys raise an error that names them."""
    cfg = OmegaConf.structured(TrainConfig)
    if path is not None:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def world_size(t: TrainerConfig) -> int:
    """Processes in the run: devices per node as Lightning parses them ("auto", 2, "0,1", [0, 1]) × nodes."""
    on_cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())
    accelerator = CPUAccelerator if on_cpu else CUDAAccelerator
    devices = OmegaConf.to_object(t.devices) if isinstance(t.devices, ListConfig) else t.devices
    devices = accelerator.auto_device_count() if devices == "auto" else accelerator.parse_devices(devices)
    return (devices if isinstance(devices, int) else len(devices)) * t.num_nodes


def schedule(cfg: DictConfig) -> tuple[int, int]:
    """(max_steps, accumulate_grad_batches) from the global batch, micro batch, devices and max_tokens."""
    t = cfg.trainer
    seq_len = int(cfg.data.get("seq_len", 1024))
    per_step = t.micro_batch_size * world_size(t)
    if t.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size={t.global_batch_size} is not divisible by micro_batch_size × devices = {per_step}"
        )
    if t.max_tokens > 0:
        max_steps = math.ceil(t.max_tokens / (t.global_batch_size * seq_len))
    elif t.max_steps > 0:
        max_steps = t.max_steps
    else:
        raise ValueError("set trainer.max_tokens (preferred) or trainer.max_steps to a positive number")
    return max_steps, t.global_batch_size // per_step


def build_strategy(cfg: DictConfig, model: torch.nn.Module):
    t = cfg.trainer
    if t.strategy != "fsdp":
        return t.strategy
    from lightning.pytorch.strategies import FSDPStrategy

    layer_cls = {type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
    return FSDPStrategy(
        auto_wrap_policy=layer_cls,
        activation_checkpointing_policy=layer_cls if t.activation_checkpointing else None,
        sharding_strategy="FULL_SHARD",
        state_dict_type="full",
    )


def calibration_batches(data_module, n: int) -> list[torch.Tensor]:
    """The first n training batches' input_ids (pruning calibration data, as in LLM-Pruner / SparseGPT)."""
    data_module.prepare_data()
    batches = []
    for batch in data_module.train_dataloader():
        batches.append(batch["input_ids"])
        if len(batches) == n:
            return batches
    raise ValueError(f"the training stream ended before {n} calibration batches")


def prepare_model(cfg: DictConfig, data_module) -> tuple[torch.nn.Module, int]:
    """Load the dense model, apply the method once and keep that structure in run_dir/init_model.

    A resumed run reloads the saved structure, so pruning decisions and router inits are never redone.
    Returns the model and the dense model's parameter count (the activated-params denominator).
    """
    method = get_method(cfg.method)
    init_dir = Path(cfg.out_dir) / cfg.run_name / "init_model"
    info = init_dir / "dense_params.json"
    if info.exists():
        return method.load(init_dir), json.loads(info.read_text())["dense_params"]
    dense, tokenizer = load_model(cfg.model)
    dense_params = count_params(dense)
    options = dict(cfg.method_options)
    target = options.pop("match_activated", None)  # fraction of the dense params, or an absolute count
    if target is not None:
        from dsmoe.baselines.matching import match_options

        match = match_options(cfg.method, dense, float(target), options)
        print(
            f"[dsmoe.train] {cfg.method} matched to {match.target:.4g} activated params: {match.options} "
            f"→ {match.achieved:.4g} ({100 * match.rel_error:+.2f}%) {match.note}",
            file=sys.stderr,
        )
        options = {**options, **match.options}
    calib = calibration_batches(data_module, cfg.calibration_batches) if method.needs_calibration else None
    model = method.apply(dense, options, calib)
    method.save(model, init_dir, tokenizer)
    info.write_text(json.dumps({"dense_params": dense_params, "model": cfg.model}))  # written last: marks completion
    return model, dense_params


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (experiments/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. trainer.max_steps=10")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    return train(cfg)


def train(cfg: DictConfig, callbacks: list[L.Callback] | None = None) -> Path:
    """Run continued pre-training; returns the HF-format directory of the final model."""
    from dsmoe.data import DataConfig, PretrainDataModule

    t = cfg.trainer
    L.seed_everything(t.seed, workers=True)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    max_steps, accumulate = schedule(cfg)
    data_cfg = DataConfig.from_dict(
        {**OmegaConf.to_container(cfg.data), "micro_batch_size": t.micro_batch_size, "seed": t.seed}
    )
    tokenizer = load_tokenizer(cfg.model)
    data = PretrainDataModule(data_cfg, tokenizer)
    model, dense_params = prepare_model(cfg, data)
    if t.activation_checkpointing and t.strategy != "fsdp":  # FSDP applies its own, per decoder layer
        model.gradient_checkpointing_enable()
    method = get_method(cfg.method)
    lit = LitCausalLM(model, method, OptimConfig(**cfg.optim), dense_params, data.val_source_names)
    precision = t.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() and t.accelerator != "cpu" else "32-true"
    seq_len = data_cfg.seq_len
    callbacks = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            every_n_train_steps=t.checkpoint_every_n_steps,
            save_last="link",
            save_top_k=-1,
        ),
        LearningRateMonitor(logging_interval="step"),
        # train/device/items_per_sec = tokens/s per device, a rolling mean over 10 batches
        ThroughputMonitor(
            batch_size_fn=lambda b: b["input_ids"].shape[0], length_fn=lambda b: b["input_ids"].numel(), window_size=10
        ),
        *(callbacks or []),
    ]
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg, model),
        precision=precision,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=t.gradient_clip_val,
        val_check_interval=t.val_check_interval * accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        logger=TensorBoardLogger(str(run_dir), name="tensorboard", version=""),
        callbacks=callbacks,
        deterministic=t.deterministic,
        enable_progress_bar=True,
    )
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        print(
            f"[dsmoe.train] {cfg.method} on {cfg.model}: {max_steps} steps × {t.global_batch_size} seqs × {seq_len} tokens; "
            f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}",
            file=sys.stderr,
        )
    ckpt = cfg.resume
    if ckpt == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        ckpt = str(last) if last.exists() else None
    trainer.fit(lit, datamodule=data, ckpt_path=ckpt)
    final = run_dir / "final"
    if trainer.is_global_zero:
        method.save(lit.model, final, tokenizer)
        summary = {
            "max_steps": max_steps,
            "global_step": trainer.global_step,
            "tokens": trainer.global_step * t.global_batch_size * seq_len,
        }
        write_json(run_dir / "train_summary.json", summary)
        if not t.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return final


def export(checkpoint: str | Path, run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the model of a Lightning checkpoint of run_dir as an HF-format directory (dsmoe.load reads DSMoE ones)."""
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    method = get_method(cfg.method)
    model = method.load(run_dir / "init_model")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return method.save(model, Path(out_dir), load_tokenizer(cfg.model))


if __name__ == "__main__":
    main()
