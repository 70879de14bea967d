"""What training needs to know about its processes: which rank this is before any process group exists, waiting for
the one rank that prepares a run, and the FSDP pieces the suite uses (mixed-precision policy, gradient clipping, a
full state dict for exports, global reductions).

Everything here works on plain torch modules, so the FSDP logic is tested with torch FSDP on CPU (gloo) although
Lightning only runs FSDP on GPUs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

# global rank as set by the launchers we support: torchrun / torch.distributed (RANK), SLURM's srun (SLURM_PROCID)
RANK_VARIABLES = ("RANK", "SLURM_PROCID")


def launch_rank() -> int:
    """This process's global rank as its launcher set it, before any process group exists (0 when launched alone).

    Lightning's own launcher starts the other ranks from inside rank 0's ``Trainer.fit``; they carry LOCAL_RANK and
    NODE_RANK, and only run after rank 0 has done everything before ``fit``."""
    for name in RANK_VARIABLES:
        if name == "SLURM_PROCID" and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
            continue  # an interactive allocation running a single process
        if name in os.environ:
            return int(os.environ[name])
    return int(os.environ.get("LOCAL_RANK", "0")) + int(os.environ.get("NODE_RANK", "0")) * int(
        os.environ.get("LOCAL_WORLD_SIZE", "1")
    )


def launch_id() -> str | None:
    """What all ranks of this launch share and no other launch has: torchrun's rendezvous id (with --standalone a
    fresh uuid; "none", the default of --rdzv-id, identifies nothing), else the srun step with the job's requeue
    count; then, after "#", torchrun's restart count, which each node counts for itself (a node whose worker failed
    counts a restart, the others may not). None when unknown."""
    env = os.environ
    restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun:{run_id}#{restart}"
    if "SLURM_JOB_ID" in env and "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return f"slurm:{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}.{env.get('SLURM_RESTART_COUNT', '0')}#{restart}"
    return None


def wait_for(done: Path, failed: Path, what: str, poll_seconds: float = 5.0, stale_seconds: float = 120.0) -> None:
    """Block until ``done`` exists (another rank finished ``what``); raise if ``failed`` appears (it holds the reason).

    Ranks share the run directory (a shared filesystem on multi-node clusters). Under torchrun/srun every rank starts
    at once, before rank 0 has removed an earlier launch's ``failed``: a file naming another launch is ignored, and
    one that cannot say (no launch id, or only the restart count differs) is believed only once it has stayed
    ``stale_seconds``."""
    start = last_note = time.monotonic()
    ours, seen_since = launch_id(), None
    while not done.exists():
        reason = _read(failed)
        if reason is None:
            seen_since = None
        else:
            theirs, message = None, reason
            if reason.startswith("launch: "):
                launch, _, message = reason.partition("\n")
                theirs = launch.removeprefix("launch: ") or None
            if ours is not None and theirs == ours:
                raise RuntimeError(f"rank 0 failed to {what}: {message.strip()}")
            if ours is None or theirs is None or theirs.split("#")[0] == ours.split("#")[0]:
                # cannot tell: an earlier launch's (or restart's), or this one's
                seen_since = seen_since if seen_since is not None else time.monotonic()
                if time.monotonic() - seen_since >= stale_seconds:
                    raise RuntimeError(f"rank 0 failed to {what}: {message.strip()}")
        if time.monotonic() - last_note > 60:
            last_note = time.monotonic()
            print(f"[dsmoe] waiting for rank 0 to {what} ({time.monotonic() - start:.0f} s)", file=sys.stderr)
        time.sleep(poll_seconds)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def run_once(done: Path, failed: Path, what: str, work: Callable[[], None]) -> None:
    """Rank 0 runs ``work`` (which must create ``done`` last); the other ranks wait for it. A failure is written to
    ``failed``, with this launch's id, so that the waiting ranks stop with its reason instead of waiting forever."""
    if done.exists():
        return
    if launch_rank() != 0:
        wait_for(done, failed, what)
        return
    failed.unlink(missing_ok=True)
    try:
        work()
    except BaseException as error:
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(f"launch: {launch_id() or ''}\n{type(error).__name__}: {error}\n")
        raise


# ---------------------------------------------------------------------------------------------- FSDP


def mixed_precision_policy(precision: str):
    """FSDP's policy for Lightning's ``precision``: parameters in the low dtype for compute (under *-true they are
    stored in it too), but buffers (RoPE's ``inv_freq``) and the gradient reduction in fp32. Lightning's default
    policy casts both to bf16, which rounds ``inv_freq`` (up to ~1.2 rad of angle error at position 1024 for
    Llama-2-7B) and sums gradients in bf16. None for full precision."""
    from torch.distributed.fsdp import MixedPrecision

    low = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])
    if low is None:
        return None
    return MixedPrecision(param_dtype=low, reduce_dtype=torch.float32, buffer_dtype=torch.float32)


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def clip_grad_norm(module: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients' global L2 norm to ``max_norm``; returns the norm before clipping.

    Under FSDP each rank holds a shard of every gradient, so the norm needs FSDP's own ``clip_grad_norm_`` on the
    root module (torch's would clip each shard by its local norm)."""
    if is_fsdp(module):
        return module.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict. Under FSDP a collective: every rank must call it; rank 0 gets the tensors (on the
    CPU when training on GPUs), the others an empty dict. Otherwise the module's own state dict."""
    if not is_fsdp(module):
        return module.state_dict()
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    on_cpu = next(module.parameters()).device.type == "cpu"  # offloading from CPU to CPU crashes torch 2.13 (gloo)
    config = FullStateDictConfig(offload_to_cpu=not on_cpu, rank0_only=True)
    with FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT, config):
        return module.state_dict()


def clean_name(name: str) -> str:
    """A parameter name without the wrapper prefixes FSDP and activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all processes (in place); unchanged without a process group."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_finite(module: nn.Module) -> bool:
    """Whether every parameter on every process is finite (each process checks its own shards)."""
    bad = torch.zeros(1, dtype=torch.float32, device=next(module.parameters()).device)
    for p in module.parameters():
        if p.numel() and not torch.isfinite(p).all():
            bad += 1
            break
    return bool(all_reduce_sum(bad).item() == 0)


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
