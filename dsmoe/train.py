"""Continued pre-training entry point: config → prepared model → Trainer.fit → final/ (+ exports at token points).

    python -m dsmoe.train --config experiments/configs/llama1b_dsmoe.yaml [key=value ...]

One command is one training run: Lightning starts the other processes of a node itself (trainer.devices); for
several nodes start one process per GPU with torchrun or srun (README, "Several GPUs and nodes"). The YAML is merged
over the structured defaults below (an unknown key is an error naming it), then the dot-list overrides. Every method
(DSMoE and its variants, top-k MoE, pruners) goes through the same LightningModule and DataModule.

A run directory holds:
  init_model/    the method applied once to the dense model (conversion, calibration, pruning), by rank 0 alone, in
                 the dtype training holds its weights in (fp32; 16-bit under *-true precision), so that every
                 process maps the same file instead of holding its own converted copy; tied to the configuration
                 that made it (config.yaml); its weights are deleted when the run finishes (unless
                 trainer.keep_checkpoints)
  checkpoints/   resume checkpoints (weights + optimizer + data-stream position), rotated; deleted at the end
                 unless trainer.keep_checkpoints
  exports/tokens_<N>/  weights-only HF directories at trainer.export_tokens (Tables 5/6)
  final/         the trained model, weights only, HF format (dsmoe.models.load_model reads every method)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.callbacks import LearningRateMonitor, ThroughputMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from dsmoe.checkpoints import AtomicCheckpointIO, AtomicFSDPStrategy, ResumeCheckpoints, resume_checkpoint
from dsmoe.cli import run as run_cli
from dsmoe.cli import say
from dsmoe.config_checks import is_plain_name
from dsmoe.config_merge import merged, set_in_list, set_leaves, through_a_list
from dsmoe.distributed import barrier, full_state_dict, is_fsdp, launch_rank, mixed_precision_policy, run_once
from dsmoe.lit import LitCausalLM, NonFiniteLossError, OptimConfig
from dsmoe.matching import parse_target
from dsmoe.methods import get_method, match_options
from dsmoe.models import EMBEDDED, cast_parameters, check_model_location, load_model, load_tokenizer
from dsmoe.packages import write_atomic, write_json
from dsmoe.progress import progress_callbacks
from dsmoe.results import training_hardware
from dsmoe.stats import count_params

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")  # not 16-true: AdamW cannot train in fp16
STRATEGIES = ("auto", "ddp", "fsdp")
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NO_WARMUP_SCHEDULES = ("constant", "reduce_lr_on_plateau", "greedy")  # transformers.get_scheduler drops their warmup
PREEMPTED = 143  # exit status after SIGTERM (128 + 15), once the checkpoint is written
PREEMPTED_MARKER = "preempted"  # written in the run directory by rank 0 when it stops so


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
    gradient_clip_val: float | None = 1.0  # global gradient-norm clip (None: off)
    val_check_interval: int = 100  # optimizer steps between validations
    limit_val_batches: Any = 1.0  # int: N micro-batches of windows per source (over all ranks); float: a fraction
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 100  # resume checkpoints (weights + optimizer state)
    keep_last_checkpoints: int = 2  # resume checkpoints are rotated: only the newest N are kept
    keep_checkpoints: bool = False  # True: keep checkpoints/ once final/ is written (False saves disk)
    # tokens seen at which weights-only HF exports are written (Any: a scalar reaches check_values, which names it)
    export_tokens: Any = field(default_factory=list)
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
    calibration_sequences: int = 32  # pruners calibrate on this many training sequences, at any micro-batch size
    data: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    resume: str | None = None  # null | last | path to a checkpoint
    # set by the experiment drivers: method_options.match_activated is the fraction this run (e.g. "dsmoe") measured
    match_activated_from: str | None = None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Structured defaults ← YAML ← dot-list overrides; unknown keys raise an error that names them. A whole
    ``method_options={...}`` override replaces the YAML's options (e.g. with another method's); a key through a
    list (``data.sources.0.weight=0.5``) sets that item's field."""
    cfg = OmegaConf.structured(TrainConfig)
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        cfg = merged(cfg, read_yaml(lambda: OmegaConf.load(path), str(path)), schema=TrainConfig, where=str(path))
    overrides = [o.strip() for o in overrides]
    if overrides:
        if any(o.partition("=")[0].strip() == "method_options" for o in overrides):
            cfg.method_options = {}  # method_options={...} replaces the YAML's options (method_options.k=v sets one)
        for override in overrides:
            if "=" not in override:
                raise ValueError(f"the command line: {override!r} is not an override of the form key=value")
        into_lists = [o for o in overrides if through_a_list(cfg, o.partition("=")[0])]
        rest = [o for o in overrides if o not in into_lists]
        given = read_yaml(lambda: OmegaConf.from_dotlist(rest), "the command line")
        cfg = merged(cfg, given, schema=TrainConfig, where="the command line")
        for override in into_lists:  # data.sources.0.weight=0.5: one field of a list's item
            set_in_list(cfg, override, "the command line")
    return cfg


def read_yaml(read, where: str):
    """``read()``, with a YAML syntax error turned into a ValueError naming ``where``."""
    try:
        return read()
    except yaml.YAMLError as error:
        raise ValueError(f"{where} is not valid YAML: {' '.join(str(error).split())}") from None


def on_gpu(t: TrainerConfig) -> bool:
    return t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())


def world_size(t: TrainerConfig) -> int:
    """Processes in the run: devices per node as Lightning parses them ("auto", 2, "0,1", [0, 1]) × nodes."""
    accelerator = CUDAAccelerator if on_gpu(t) else CPUAccelerator
    devices = OmegaConf.to_object(t.devices) if isinstance(t.devices, ListConfig) else t.devices
    devices = accelerator.auto_device_count() if devices == "auto" else accelerator.parse_devices(devices)
    return (devices if isinstance(devices, int) else len(devices)) * t.num_nodes


def first_gpu(t: TrainerConfig) -> torch.device:
    """The GPU of the run's first process (rank 0 prepares the model): trainer.devices' first, as Lightning picks."""
    devices = OmegaConf.to_object(t.devices) if isinstance(t.devices, ListConfig) else t.devices
    return torch.device("cuda", 0 if devices == "auto" else CUDAAccelerator.parse_devices(devices)[0])


def schedule(cfg: DictConfig) -> tuple[int, int]:
    """(max_steps, accumulate_grad_batches) from the global batch, micro batch, devices and max_tokens."""
    from dsmoe.data.config import data_seq_len

    t = cfg.trainer
    seq_len = data_seq_len(cfg.data)
    per_step = t.micro_batch_size * world_size(t)
    if t.global_batch_size % per_step:
        raise ValueError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size × processes "
            f"(devices × num_nodes) = {t.micro_batch_size} × {per_step // t.micro_batch_size} = {per_step}"
        )
    if t.max_tokens > 0:
        max_steps = math.ceil(t.max_tokens / (t.global_batch_size * seq_len))
    elif t.max_steps > 0:
        max_steps = t.max_steps
    else:
        raise ValueError("set trainer.max_tokens (preferred) or trainer.max_steps to a positive number")
    warmup = cfg.optim.warmup_steps
    if warmup > 0 and warmup >= max_steps:
        raise ValueError(
            f"optim.warmup_steps={warmup} is not below the run's {max_steps} optimizer steps: the learning rate would "
            f"never reach optim.lr; give fewer warmup steps or a longer run (steps = trainer.max_tokens / "
            f"(global_batch_size × data.seq_len) when max_tokens is set)"
        )
    return max_steps, t.global_batch_size // per_step


def resolved_precision(t: TrainerConfig) -> str:
    return ("bf16-mixed" if on_gpu(t) else "32-true") if t.precision == "auto" else t.precision


def weights_dtype(t: TrainerConfig) -> torch.dtype:
    """The dtype training holds the weights in: fp32 master weights (32-true and the mixed precisions, whose
    plugins cast for compute), bf16 under bf16-true."""
    return torch.bfloat16 if resolved_precision(t) == "bf16-true" else torch.float32


def export_dtype(t: TrainerConfig) -> torch.dtype:
    """The dtype of final/ and the exports: the training compute dtype (bf16/fp16 under mixed precision)."""
    if t.export_dtype != "auto":
        return EXPORT_DTYPES[t.export_dtype]
    precision = resolved_precision(t)
    return (
        torch.bfloat16
        if precision.startswith("bf16")
        else torch.float16
        if precision.startswith("16")
        else torch.float32
    )


ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


def check_devices(t: TrainerConfig) -> None:
    """trainer.accelerator and trainer.devices as Lightning will read them, on this machine."""
    if t.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.accelerator={t.accelerator!r} but this machine has no GPU: run it on a GPU machine, or set "
            "trainer.accelerator=cpu (with trainer.precision=32-true) for a CPU run"
        )
    try:
        processes = world_size(t)
    except (MisconfigurationException, TypeError, ValueError) as error:
        raise ValueError(f"trainer.devices={t.devices!r} (accelerator {t.accelerator!r}): {error}") from None
    if processes < 1:
        raise ValueError(f"trainer.devices={t.devices!r} gives no process; give a positive count or device list")
    launched = launched_world_size()
    if launched is not None and launched[0] != processes and not lightning_starts_the_processes(t):
        raise ValueError(
            f"{launched[1]} {launched[0]} processes but trainer.devices={t.devices!r} × trainer.num_nodes="
            f"{t.num_nodes} gives {processes}: make them agree (trainer.num_nodes=<nodes>, trainer.devices=<processes "
            "per node>). Under SLURM, Lightning starts no processes itself: start one task per device (srun "
            "--ntasks-per-node=<devices>, or DSMOE_LAUNCHER for the experiment scripts; README, 'Several GPUs and "
            "nodes')"
        )


def lightning_starts_the_processes(t: TrainerConfig) -> bool:
    """In a SLURM job step of one task on one node (``sbatch --ntasks=1 --gpus=8``, the usual single-node job),
    Lightning would take SLURM's one task for the whole world and refuse trainer.devices > 1: there it is given its
    own cluster environment instead and starts the processes itself, as outside SLURM."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    single_task = SLURMEnvironment.detect() and int(os.environ["SLURM_NTASKS"]) == 1
    return single_task and t.num_nodes == 1 and world_size(t) > 1


def launched_world_size() -> tuple[int, str] | None:
    """(processes, who started them) when torchrun or SLURM started this process, as Lightning will read them; None
    when Lightning starts the processes itself."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return int(os.environ["WORLD_SIZE"]), "torchrun started"
    if SLURMEnvironment.detect():
        return int(os.environ["SLURM_NTASKS"]), "this SLURM job step has (SLURM_NTASKS)"
    return None


def check_values(cfg: DictConfig):
    """The configuration's values on their own: no file is read and nothing is asked of this machine (the disk plan
    checks every run of a scale with it). Returns the run's :class:`~dsmoe.data.DataConfig`."""
    t, o = cfg.trainer, cfg.optim
    name = None if OmegaConf.is_missing(cfg, "run_name") else cfg.run_name
    if name is not None and not is_plain_name(name):
        raise ValueError(
            f"run_name {name!r} is not a plain name (no path separators or '..'): it names the run's folder in out_dir"
        )
    if not isinstance(t.export_tokens, (list, ListConfig)):
        raise ValueError(
            f"trainer.export_tokens must be a list of token counts (e.g. [1e9, 2e9]), got {t.export_tokens!r}"
        )

    def positive(name: str, value: Any, integer: bool = True) -> None:
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
            raise ValueError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")

    for key in ("global_batch_size", "micro_batch_size", "val_check_interval", "checkpoint_every_n_steps"):
        positive(f"trainer.{key}", t[key])
    positive("trainer.keep_last_checkpoints", t.keep_last_checkpoints)
    positive("trainer.log_every_n_steps", t.log_every_n_steps)
    positive("trainer.num_nodes", t.num_nodes)
    positive("calibration_sequences", cfg.calibration_sequences)
    positive("optim.lr", o.lr, integer=False)
    if o.weight_decay < 0:
        raise ValueError(f"optim.weight_decay must be >= 0, got {o.weight_decay!r}")
    limit = t.limit_val_batches
    if isinstance(limit, bool) or not (
        (isinstance(limit, int) and limit > 0) or (isinstance(limit, float) and 0 < limit <= 1)
    ):
        raise ValueError(
            f"trainer.limit_val_batches must be a positive number of batches per source or a fraction in (0, 1], "
            f"got {limit!r}"
        )
    if t.accelerator not in ACCELERATORS:
        raise ValueError(f"trainer.accelerator {t.accelerator!r} is unknown; choose one of {list(ACCELERATORS)}")
    if t.max_tokens < 0:
        raise ValueError(f"trainer.max_tokens must be >= 0, got {t.max_tokens!r}")
    if o.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps!r}")
    if not all(0 <= b < 1 for b in o.betas):
        raise ValueError(f"optim.betas must lie in [0, 1), got {list(o.betas)}")
    from transformers.trainer_utils import SchedulerType

    schedules = [s.value for s in SchedulerType]
    if o.schedule not in schedules:
        raise ValueError(f"optim.schedule {o.schedule!r} is unknown; choose one of {schedules}")
    if o.warmup_steps > 0 and o.schedule in NO_WARMUP_SCHEDULES:
        raise ValueError(
            f"optim.warmup_steps={o.warmup_steps} would be ignored: optim.schedule={o.schedule!r} has no warmup; use "
            "constant_with_warmup (or cosine, linear, ...), or optim.warmup_steps=0"
        )
    if t.precision == "16-true":
        raise ValueError(
            "trainer.precision '16-true' cannot train with AdamW: its moments in fp16 underflow (eps=1e-8 rounds to 0) "
            "and the first updates make the weights inf/NaN; use 16-mixed (fp32 weights, fp16 compute) or bf16-mixed"
        )
    if t.precision not in PRECISIONS:
        raise ValueError(f"trainer.precision {t.precision!r} is unknown; choose one of {list(PRECISIONS)}")
    if t.precision == "bf16-true":
        rank_zero_warn(  # once, not by every rank
            "trainer.precision bf16-true holds the weights and AdamW's state in bf16, whose spacing near a weight w is "
            f"about |w|/128: AdamW's updates, about optim.lr = {o.lr:g}, are lost on weights with |w| > {256 * o.lr:.2g}, "
            "which then never change (a Llama's weights have std ~0.02). bf16-mixed trains with fp32 master weights.",
        )
    if t.strategy not in STRATEGIES:
        raise ValueError(f"trainer.strategy {t.strategy!r} is unknown; choose one of {list(STRATEGIES)}")
    if t.export_dtype != "auto" and t.export_dtype not in EXPORT_DTYPES:
        raise ValueError(
            f"trainer.export_dtype {t.export_dtype!r} is unknown; choose auto or one of {list(EXPORT_DTYPES)}"
        )
    if t.gradient_clip_val is not None and t.gradient_clip_val <= 0:
        raise ValueError(f"trainer.gradient_clip_val must be > 0 or null (no clipping), got {t.gradient_clip_val!r}")
    method = get_method(cfg.method)  # an unknown method fails here, naming the known ones
    options = dict(OmegaConf.to_container(cfg.method_options))
    target = options.pop("match_activated", None)
    parse_target(None if target == "dsmoe" else target)  # "dsmoe": resolved by the experiment driver
    matched = target is not None
    if matched and method.match is None:
        raise ValueError(f"method {cfg.method!r} takes no method_options.match_activated (its activation is learned)")
    method.check_options(options, matched)
    from dsmoe.data import DataConfig

    return DataConfig.from_dict({**OmegaConf.to_container(cfg.data), "micro_batch_size": t.micro_batch_size})


def check_config(cfg: DictConfig) -> None:
    """Everything that can be checked before any model is loaded, converted or written: the values
    (:func:`check_values`), the devices on this machine, the run's length, the data files and the model path."""
    data = check_values(cfg)
    parse_target(cfg.method_options.get("match_activated"))  # the run itself must be given a number
    t = cfg.trainer
    check_devices(t)
    check_model_location(cfg.model)
    check_seq_len(data.seq_len, cfg.model)  # before the schedule: a seq_len too long also makes the run too short
    experts = get_method(cfg.method).experts
    if experts is not None:
        check_architecture(cfg.model, experts(OmegaConf.to_container(cfg.method_options)))
    check_vocabulary(cfg.model)
    max_steps, _ = schedule(cfg)
    total = max_steps * t.global_batch_size * data.seq_len
    for point in t.export_tokens:
        if isinstance(point, bool) or not isinstance(point, (int, float)) or not 0 < point <= total:
            raise ValueError(
                f"trainer.export_tokens: {point!r} is not a token count in (0, {total}] (the run's tokens)"
            )
    check_files = getattr(data, "check_files", None)
    if check_files is not None:
        check_files()


def offline_config(model: str) -> Any:
    """The model's config where it can be read offline (:func:`dsmoe.models.model_config`), else None (e.g. a hub
    model not in the local cache): the checks below then leave it to loading the model."""
    from dsmoe.models import model_config

    try:
        return model_config(model)
    except (OSError, ValueError):
        return None


def check_seq_len(seq_len: int, model: str) -> None:
    """The model reads windows of seq_len + 1 tokens: they must fit its max_position_embeddings (RoPE models would
    train past it silently). Checked where the model's config can be read offline."""
    limit = getattr(offline_config(model), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len + 1 > limit:
        raise ValueError(
            f"data.seq_len={seq_len} exceeds the model's max_position_embeddings={limit}: the model reads windows of "
            f"seq_len + 1 = {seq_len + 1} tokens; give data.seq_len <= {limit - 1}"
        )


def check_architecture(model: str, num_experts: Any) -> None:
    """For a method that cuts the FFN into ``num_experts`` (DSMoE, LLaMA-MoE): the model, from its config where it
    can be read offline, is a dense Llama-family model (an intermediate_size; not a mixture of experts already)
    whose intermediate size n divides (eq. 6). Otherwise found only once the model is loaded and the run written."""
    from dsmoe.hf_remote.partitioned_swiglu import already_moe, expert_size

    config = offline_config(model)
    if config is None:
        return
    kind = getattr(config, "model_type", "?")
    moe = already_moe(config)
    if moe is not None:
        raise ValueError(
            f"model {model!r} ({kind}) is a mixture of experts already (config.{moe}): DSMoE and "
            "LLaMA-MoE cut the dense SwiGLU FFN of Llama-family models (Llama, Qwen2, Mistral, ...)"
        )
    width = getattr(config, "intermediate_size", None)
    if not isinstance(width, int):
        raise ValueError(
            f"model {model!r} ({kind}) has no intermediate_size in its config: not a Llama-family "
            "model with a SwiGLU FFN (Llama, Qwen2, Mistral, ...)"
        )
    if isinstance(num_experts, int) and num_experts > 0:
        expert_size(width, num_experts)


def check_vocabulary(model: str) -> None:
    """Every id text can become must index the embedding: below config.vocab_size (a smaller embedding fails deep
    in the first forward: an IndexError on the CPU, a device-side assert on a GPU). Checked for a local directory
    (one put together by hand); hub models and the embedded one ship their own tokenizer."""
    if not Path(model).expanduser().is_dir():
        return
    vocab = getattr(offline_config(model), "vocab_size", None)
    if not isinstance(vocab, int):
        return
    tokenizer = load_tokenizer(model)
    # the ids text can become: the base vocabulary, added tokens that are not special, BOS/EOS (a special token
    # added but never produced, e.g. a pad token the suite does not use, is no fault)
    produced = [tokenizer.vocab_size - 1, tokenizer.bos_token_id, tokenizer.eos_token_id]
    produced += [i for i, token in tokenizer.added_tokens_decoder.items() if not token.special]
    largest = max(i for i in produced if i is not None)
    if largest >= vocab:
        raise ValueError(
            f"model {model!r}: its tokenizer gives ids up to {largest} but config.vocab_size={vocab}: they would "
            f"index past the embedding; give the model its own tokenizer, or grow its embedding first "
            f"(model.resize_token_embeddings({len(tokenizer)}), then save_pretrained)"
        )


# ---------------------------------------------------------------------------------------------- preparation

# what decides a run's result besides model, method, options, data and optim (not where it runs, on how many devices,
# or how often it validates and checkpoints: those may change between a run and its resumption)
RESULT_TRAINER_KEYS = ("global_batch_size", "max_tokens", "max_steps", "gradient_clip_val", "precision", "seed")


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings that decide a run's result, flattened to dotted keys. A fraction the driver measured to match
    (``match_activated_from``, e.g. DSMoE's) is not one: the run is what it was matched to."""
    c = OmegaConf.to_container(cfg)
    settings = {"model": c["model"], "method": c["method"]}
    if get_method(c["method"]).needs_calibration:  # the others never read calibration data
        settings["calibration_sequences"] = c["calibration_sequences"]
    settings.update({f"method_options.{k}": v for k, v in c["method_options"].items()})
    settings["match_activated_from"] = c.get("match_activated_from")
    if settings["match_activated_from"] is not None:
        settings.pop("method_options.match_activated", None)
    settings.update({f"optim.{k}": v for k, v in c["optim"].items()})
    settings.update({f"trainer.{k}": c["trainer"][k] for k in RESULT_TRAINER_KEYS})
    settings["data"] = c["data"]
    return json.loads(json.dumps(settings))  # tuples as lists, as in the YAML file


def saved_config(run_dir: Path) -> DictConfig | None:
    """The configuration a run directory was started with (config.yaml) over the current defaults: keys added since
    keep their defaults, keys since removed are left out."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    cfg = OmegaConf.structured(TrainConfig)
    old = OmegaConf.load(path)
    set_leaves(cfg, old)
    if "calibration_batches" in old:  # renamed: it counted micro-batches
        micro = OmegaConf.select(old, "trainer.micro_batch_size", default=cfg.trainer.micro_batch_size)
        cfg.calibration_sequences = old.calibration_batches * micro
    return cfg


def holds_work(run_dir: Path) -> bool:
    """Whether run_dir holds a prepared model, a checkpoint or a result (not only a failed preparation's config)."""
    return (run_dir / "init_model" / "dense_params.json").exists() or has_trained(run_dir)


def has_trained(run_dir: Path) -> bool:
    """Whether run_dir holds a checkpoint, an export or a result (more than the prepared model)."""
    checkpoints = run_dir / "checkpoints"
    return (
        (checkpoints.is_dir() and any(checkpoints.iterdir()))
        or any((run_dir / "exports").glob("tokens_*"))
        or (run_dir / "final").exists()
    )


# what init_model/ depends on besides the method's options (run_settings holds "data" only where it calibrates on it)
PREPARED_KEYS = (
    "model",
    "method",
    "calibration_sequences",
    "match_activated_from",
    "trainer.seed",
    "trainer.precision",
)


def prepared_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Of :func:`run_settings`, those that decide the prepared model (init_model/): model, method and options,
    seed (router init, calibration sample), precision (its dtype) and, for a method that calibrates, its data."""
    calibrates = "calibration_sequences" in settings
    return {
        k: v
        for k, v in settings.items()
        if k in PREPARED_KEYS or k.startswith("method_options.") or (k == "data" and calibrates)
    }


def check_same_run(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse to resume or reuse a run directory started with other result-deciding settings (its prepared model, its
    checkpoints and its result belong to those; a table would otherwise mix configurations under one provenance)."""
    saved = saved_config(run_dir)
    if saved is None or not holds_work(run_dir):
        return
    before, now = run_settings(saved), run_settings(cfg)
    if not has_trained(run_dir):  # only the prepared model: e.g. a data file corrected after preparation is taken
        before, now = prepared_settings(before), prepared_settings(now)
    differ = [
        f"{k}: {before.get(k)!r} (run) vs {now.get(k)!r} (now)" for k in now | before if before.get(k) != now.get(k)
    ]
    if differ:
        raise ValueError(
            f"{run_dir} holds a run with other settings — {'; '.join(differ)}. Restore its settings, train this "
            f"configuration under another run_name (or out_dir), or delete {run_dir} to start it afresh"
        )


def calibration_batches(data_module, sequences: int) -> list[torch.Tensor]:
    """The first ``sequences`` training sequences' input_ids, in training's micro-batches (the last one cut): pruning
    calibration data, as in LLM-Pruner / SparseGPT. The same sequences whatever the micro-batch size."""
    data_module.prepare_data()
    batches, seen = [], 0
    for batch in data_module.train_dataloader():
        batches.append(batch["input_ids"][: sequences - seen])
        seen += len(batches[-1])
        if seen == sequences:
            return batches
    raise ValueError(f"the training stream ended before {sequences} calibration sequences")


def prepare_model(cfg: DictConfig, init_dir: Path) -> None:
    """Load the dense model, apply the method once (on the GPU when training there) and save it to init_dir in the
    dtype training holds the weights in; dense_params.json is written last and marks completion. Saved so, the
    weights every process loads are memory-mapped pages of one file, shared through the page cache (an 8-GPU node
    at 7B would otherwise hold 8 private fp32 copies, ~216 GB, before FSDP shards them)."""
    from dsmoe.data import DataConfig, PretrainDataModule

    method = get_method(cfg.method)
    options = dict(cfg.method_options)
    target = parse_target(options.pop("match_activated", None))  # a fraction of the dense params, or a count
    L.seed_everything(cfg.trainer.seed)  # router inits, calibration sampling
    dense, tokenizer = load_model(cfg.model)
    dense_params = count_params(dense)
    if target is not None:
        match = match_options(cfg.method, dense, target, options)
        print(
            f"[dsmoe.train] {cfg.method} matched to {match.target:.4g} activated params: {match.options} "
            f"→ {match.achieved:.4g} ({100 * match.rel_error:+.2f}%) {match.note}",
            file=sys.stderr,
        )
        options = {**options, **match.options}
    calib = None
    if method.needs_calibration:
        data_cfg = {**OmegaConf.to_container(cfg.data), "micro_batch_size": cfg.trainer.micro_batch_size}
        data = PretrainDataModule(DataConfig.from_dict({**data_cfg, "seed": cfg.trainer.seed}), tokenizer)
        calib = calibration_batches(data, cfg.calibration_sequences)
    if calib is not None and on_gpu(cfg.trainer) and torch.cuda.is_available():
        dense = dense.to(first_gpu(cfg.trainer))  # calibration (SparseGPT Hessians, LLM-Pruner gradients) on the GPU
    model = method.apply(dense, options, calib)
    method.save(model.to(device="cpu", dtype=weights_dtype(cfg.trainer)), init_dir, tokenizer)
    del model, dense
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    write_json(init_dir / "dense_params.json", {"dense_params": dense_params, "model": cfg.model})


# ---------------------------------------------------------------------------------------------- exports


def export_model(
    trainer: L.Trainer, lit: LitCausalLM, init_dir: Path, out_dir: Path, dtype: torch.dtype, tokenizer
) -> None:
    """Write the model being trained as a weights-only HF directory. Every process must call it (under FSDP the
    weights are gathered); rank 0 writes: the prepared structure from init_dir, these weights, cast to ``dtype``."""
    module = trainer.strategy.model if is_fsdp(trainer.strategy.model) else lit
    state = full_state_dict(module)
    if trainer.is_global_zero:
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        for name, tensor in state.items():  # cast first, one tensor at a time: the gathered fp32 copy goes as it does
            # on the host (DDP's state is on the GPU: its copy would take GPU memory the training still needs)
            state[name] = tensor.to(device="cpu", dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        model = lit.method.load(init_dir).to(dtype)  # cast from the mapped file: no private fp32 copy
        model.load_state_dict(state)
        lit.method.save(model, out_dir, tokenizer)
    del state
    barrier()


class ExportAtTokens(L.Callback):
    """Weights-only exports when training passes each of ``points`` tokens (Tables 5/6: PPL by tokens seen)."""

    def __init__(self, points: list[float], tokens_per_step: int, export) -> None:
        self.points, self.tokens_per_step, self.export = sorted(points), tokens_per_step, export
        self._step_seen = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_seen = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        before, now = self._step_seen * self.tokens_per_step, trainer.global_step * self.tokens_per_step
        self._step_seen = trainer.global_step
        for point in self.points:
            if before < point <= now:
                self.export(point, trainer.global_step)


def export_dir(run_dir: Path, tokens: float) -> Path:
    return run_dir / "exports" / f"tokens_{int(tokens)}"


# ---------------------------------------------------------------------------------------------- training


def build_strategy(cfg: DictConfig, model: torch.nn.Module):
    t = cfg.trainer
    if t.strategy == "ddp" or (t.strategy == "auto" and world_size(t) > 1):
        # every buffer (RoPE's frequencies, SparseGPT's masks: ~1 GB at 1B) is the same on every rank and never
        # changes: DDP's default would broadcast them all from rank 0 before every forward
        return DDPStrategy(broadcast_buffers=False)
    if t.strategy != "fsdp":
        return t.strategy
    layer_cls = {type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
    return AtomicFSDPStrategy(
        auto_wrap_policy=layer_cls,
        activation_checkpointing_policy=layer_cls if t.activation_checkpointing else None,
        sharding_strategy="FULL_SHARD",
        state_dict_type="sharded",  # each rank writes its shard: no gather of 12 bytes/param on one GPU
        mixed_precision=mixed_precision_policy(resolved_precision(t)),
    )


def strategy_name(strategy: L.pytorch.strategies.Strategy) -> str:
    """The name of Lightning's (or dsmoe's) strategy class: "ddp", "fsdp", "single_device", ..."""
    name = type(strategy).__name__.removeprefix("Atomic").removesuffix("Strategy")
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name).lower()


class Preempted(SystemExit):
    """Training stopped on SIGTERM after saving a checkpoint; ``resume=last`` continues it."""


@contextmanager
def started_ranks_stopped_on_failure(trainer: L.Trainer) -> Iterator[None]:
    """Lightning kills the ranks it started when one of them fails, not when the process it was started as (rank 0)
    fails: they would wait in their next collective until its timeout (NCCL does not notice a dead peer), holding
    their GPUs after the run has been reported failed. Rank 0 kills them here on any error but a SIGTERM, after
    which every rank saves its part of the checkpoint and stops by itself. (torchrun and srun stop their peers.)"""
    try:
        yield
    except Preempted:
        raise
    except BaseException:
        launcher = trainer.strategy.launcher
        if isinstance(launcher, _SubprocessScriptLauncher):  # only rank 0 holds the started processes
            launcher.kill(signal.SIGKILL)
        raise


def train(cfg: DictConfig, callbacks: list[L.Callback] | None = None) -> Path:
    """Run continued pre-training; returns the HF-format directory of the final model."""
    from dsmoe.data import DataConfig, PretrainDataModule

    check_config(cfg)
    t = cfg.trainer
    method = get_method(cfg.method)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    init_dir, final = run_dir / "init_model", run_dir / "final"
    check_same_run(run_dir, cfg)
    if (run_dir / "train_summary.json").exists() and (final / "config.json").exists():
        if cfg.resume == "last":
            print(f"[dsmoe.train] {run_dir} has finished: {final}", file=sys.stderr)
            return final
        raise ValueError(f"{run_dir} holds a finished run ({final}); choose another run_name or out_dir")
    ckpt = resume_checkpoint(cfg.resume, run_dir / "checkpoints")
    if launch_rank() == 0:  # before preparation: init_model/ and the checkpoints belong to this configuration
        write_atomic(run_dir / "config.yaml", lambda path: path.write_text(OmegaConf.to_yaml(cfg)))
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)  # an earlier launch's
    run_once(
        init_dir / "dense_params.json",
        run_dir / "init_model.failed",
        "prepare the model",
        lambda: prepare_model(cfg, init_dir),
    )

    L.seed_everything(t.seed, workers=True)
    max_steps, accumulate = schedule(cfg)
    data_cfg = DataConfig.from_dict(
        {**OmegaConf.to_container(cfg.data), "micro_batch_size": t.micro_batch_size, "seed": t.seed}
    )
    tokenizer = load_tokenizer(cfg.model)
    data = PretrainDataModule(data_cfg, tokenizer, t.limit_val_batches)
    # memory-mapped from init_model/ (already in this dtype: no copy); the precision plugin casts for compute
    model = cast_parameters(method.load(init_dir), weights_dtype(t))  # LitCausalLM.on_fit_start keeps RoPE fp32
    dense_params = json.loads((init_dir / "dense_params.json").read_text())["dense_params"]
    if t.activation_checkpointing and t.strategy != "fsdp":  # FSDP applies its own, per decoder layer
        model.gradient_checkpointing_enable()
    lit = LitCausalLM(model, method, OptimConfig(**cfg.optim), dense_params, data.val_source_names, t.gradient_clip_val)
    precision = resolved_precision(t)
    seq_len = data_cfg.seq_len
    tokens_per_step = t.global_batch_size * seq_len
    dtype = export_dtype(t)
    checkpoints = ResumeCheckpoints(run_dir / "checkpoints", t.checkpoint_every_n_steps, t.keep_last_checkpoints)

    def export_at(tokens: float, step: int) -> None:
        out = export_dir(run_dir, tokens)
        export_model(trainer, lit, init_dir, out, dtype, tokenizer)
        if trainer.is_global_zero:
            write_json(out / "export_info.json", {"tokens": tokens_per_step * step, "step": step, "point": tokens})

    callbacks = [
        checkpoints,
        ExportAtTokens(list(t.export_tokens), tokens_per_step, export_at),
        LearningRateMonitor(logging_interval="step"),
        # train/device/items_per_sec = tokens/s per device, a rolling mean over 10 batches
        ThroughputMonitor(
            batch_size_fn=lambda b: b["input_ids"].shape[0], length_fn=lambda b: b["input_ids"].numel(), window_size=10
        ),
        # a terminal: Lightning's progress bar; a log file (a cluster job): a plain line every log_every_n_steps
        *progress_callbacks(t.log_every_n_steps, tokens_per_step),
        *(callbacks or []),
    ]
    # LitCausalLM logs validation values already summed over the ranks (metrics' sync, counts' all-reduce); Lightning
    # would advise sync_dist=True for each of them at every validation
    warnings.filterwarnings(
        "ignore", message=r"It is recommended to use `self.log\('val/", category=PossibleUserWarning
    )
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg, model),
        precision=precision,
        plugins=[AtomicCheckpointIO(), *([LightningEnvironment()] if lightning_starts_the_processes(t) else [])],
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=None,  # LitCausalLM clips (FSDP needs its own clip, which Lightning's FSDP plugin refuses)
        val_check_interval=t.val_check_interval * accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=None,  # all the data module gives: it takes trainer.limit_val_batches (same on any ranks)
        log_every_n_steps=t.log_every_n_steps,
        logger=TensorBoardLogger(str(run_dir), name="tensorboard", version=""),
        callbacks=callbacks,
        deterministic=t.deterministic,
        enable_progress_bar=True,
    )
    if launch_rank() == 0:
        print(
            f"[dsmoe.train] {cfg.method} on {cfg.model}: {max_steps} steps × {t.global_batch_size} seqs × {seq_len} "
            f"tokens, {precision}; TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}",
            file=sys.stderr,
        )
    with started_ranks_stopped_on_failure(trainer):
        try:
            trainer.fit(lit, datamodule=data, ckpt_path=ckpt)
        except NonFiniteLossError as error:
            last = checkpoints._last_checkpoint_saved or ckpt or "none (no step finished with finite weights)"
            raise NonFiniteLossError(
                f"{error}. The last finite checkpoint is {last}; lower optim.lr, then resume=last"
            ) from None
        except SIGTERMException:
            if checkpoints.last_model_path:
                say(f"[dsmoe.train] stopped by SIGTERM; continue with resume=last ({checkpoints.last_model_path})")
            else:
                say(
                    "[dsmoe.train] stopped by SIGTERM before the first checkpoint was written; the same command with "
                    "resume=last starts this run again from its prepared model"
                )
            if trainer.is_global_zero:  # for the driver: torchrun reports the ranks' exit status 143 as 1
                (run_dir / PREEMPTED_MARKER).write_text(f"step {trainer.global_step}\n")
            raise Preempted(PREEMPTED) from None
        export_model(trainer, lit, init_dir, final, dtype, tokenizer)
        if trainer.is_global_zero:
            summary = {
                "max_steps": max_steps,
                "global_step": trainer.global_step,
                "tokens": trainer.global_step * tokens_per_step,
                "world_size": trainer.world_size,
                "precision": precision,
                "hardware": training_hardware(
                    trainer.num_nodes,
                    trainer.num_devices,
                    trainer.strategy.root_device,
                    strategy_name(trainer.strategy),
                ),
            }
            write_json(run_dir / "train_summary.json", summary)
            if not t.keep_checkpoints:  # what remains: final/, exports/, logs and the small init_model/*.json
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
                for f in init_dir.glob("model*.safetensors*"):  # the weights; the small JSON records stay
                    f.unlink()
        barrier()
    return final


def export(checkpoint: str | Path, run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the model of a Lightning checkpoint of run_dir as an HF-format directory (dsmoe.load reads DSMoE ones):
    a single file (DDP, one device) or FSDP's sharded directory, read in one process. Needs the run's init_model/
    (kept with trainer.keep_checkpoints). In the run's export dtype, like final/."""
    run_dir, checkpoint = Path(run_dir), Path(checkpoint)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    method = get_method(cfg.method)
    # cast first (from the mapped file), then load: no private fp32 copy
    model = cast_parameters(method.load(run_dir / "init_model"), export_dtype(cfg.trainer))
    if checkpoint.is_dir():
        load_sharded_weights(model, checkpoint)
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)["state_dict"]
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return method.save(model, Path(out_dir), load_tokenizer(cfg.model))


def load_sharded_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """The weights of a sharded FSDP checkpoint (Lightning's: the LightningModule's state under "model", the
    optimizer's beside it, which is not read) into ``model``, in place, without a process group."""
    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    state = {f"model.{k}": v for k, v in model.state_dict().items() if f"model.model.{k}" in stored}
    missing = sorted(name for name, _ in model.named_parameters() if f"model.{name}" not in state)
    if missing:
        raise ValueError(f"{checkpoint} holds no weights for {missing[:5]} ({len(missing)} in all): not this run's")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load({"model": state}, checkpoint_id=str(checkpoint), no_dist=True)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (experiments/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. trainer.max_steps=10")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    return train(cfg)


if __name__ == "__main__":
    run_cli(main)
