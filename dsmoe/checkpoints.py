"""Resume checkpoints that can be trusted: written atomically, rotated, never non-finite, one more on SIGTERM, and a
resume that verifies what it picks.

- :class:`AtomicCheckpointIO` / :class:`AtomicFSDPStrategy`: a checkpoint file (or FSDP's sharded checkpoint
  directory) is written under a temporary name and renamed, so a crash or a full disk never leaves something that
  looks like a checkpoint.
- :class:`ResumeCheckpoints`: every n optimizer steps, the newest k kept; refuses to save non-finite weights; on
  SIGTERM (what SLURM and spot instances send before killing) it saves at the end of the current optimizer step and
  stops the run, so nothing since the last periodic checkpoint is lost.
- :func:`resume_checkpoint`: the newest intact checkpoint, saying so when it has to skip a damaged one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dsmoe.cli import StepFailed, say
from dsmoe.distributed import all_finite

STEP = re.compile(r"step=(\d+)")
SHARDED_METADATA = "meta.pt"  # written last by Lightning's FSDP strategy into a sharded checkpoint directory


class NonFiniteError(StepFailed):
    """The loss or the weights stopped being finite; the message names the last finite checkpoint."""


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file beside the target, then rename: the target is complete or absent."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        tmp = _temporary(path)
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class AtomicFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP strategy whose sharded checkpoint directories appear only once every rank has written.

    Also runs on CPU processes (gloo), where Lightning would not: the tests train through the real FSDP path there."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(  # Lightning passes device_id=None, which FSDP refuses on CPU
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(filepath))
        if self._state_dict_type != "sharded":
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        tmp = _temporary(path)
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier("dsmoe-checkpoint-tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("dsmoe-checkpoint-written")
        if self.is_global_zero:
            if path.is_dir():
                shutil.rmtree(path)
            os.replace(tmp, path)
        self.barrier("dsmoe-checkpoint-renamed")


def is_intact(path: Path) -> bool:
    """Whether a checkpoint is complete: a zip (torch.save's format) whose every record matches its CRC-32 (a
    damaged tensor would otherwise be loaded and trained on without a word; every process reads the file once for
    it: ~6 s of CPU for 15 GB), or a sharded directory with its metadata."""
    path = Path(path)
    if path.is_dir():
        return (path / ".metadata").is_file() and (path / SHARDED_METADATA).is_file()
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            if not any(r.filename.endswith("data.pkl") for r in records):
                return False
            for record in records:
                if record.CRC:  # 0: saved without CRCs (torch.serialization.set_crc32_options(False))
                    with archive.open(record) as data:  # a mismatch raises BadZipFile at the end of the record
                        while data.read(1 << 24):
                            pass
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def step_checkpoints(directory: Path) -> list[Path]:
    """The step checkpoints in ``directory``, newest first (temporary files and the last.ckpt link excluded)."""
    found = [
        p
        for p in Path(directory).glob("*.ckpt")
        if not p.name.startswith(".") and not p.is_symlink() and STEP.search(p.name)
    ]
    return sorted(found, key=lambda p: int(STEP.search(p.name).group(1)), reverse=True)


def resume_checkpoint(resume: str | None, directory: Path) -> str | None:
    """The checkpoint to resume from. ``resume``: None (a fresh run: refused if the run already has checkpoints),
    "last" (the newest intact step checkpoint; a damaged newer one is skipped with a message; none: start at step 0),
    or a path (which must be intact)."""
    directory = Path(directory)
    found = step_checkpoints(directory) if directory.exists() else []
    if resume is None:
        if found:
            raise ValueError(
                f"{directory} already holds checkpoints (newest: {found[0].name}); pass resume=last to continue that "
                "run, or choose another run_name / out_dir for a new one"
            )
        return None
    if resume != "last":
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"resume={resume!r}: no such checkpoint (give 'last' or a checkpoint's path)")
        if not is_intact(path):
            raise ValueError(f"resume={resume!r}: the checkpoint is incomplete or damaged (not a readable checkpoint)")
        return str(path)
    link = directory / "last.ckpt"
    if link.is_symlink() and not link.exists():
        print(
            f"[dsmoe.train] {link} points to a missing checkpoint; looking for the newest intact one", file=sys.stderr
        )
    for i, path in enumerate(found):
        if is_intact(path):
            if i:
                skipped = ", ".join(p.name for p in found[:i])
                print(f"[dsmoe.train] skipping damaged checkpoint(s) {skipped}; resuming from {path}", file=sys.stderr)
            return str(path)
    if found:
        raise ValueError(
            f"no intact checkpoint in {directory}: {', '.join(p.name for p in found)} are all damaged; delete "
            f"{directory} to train again from the prepared model"
        )
    return None


class ResumeCheckpoints(ModelCheckpoint):
    """Resume checkpoints every ``every_n_steps`` optimizer steps, the newest ``keep`` kept (``last.ckpt`` links to
    the newest). Weights are checked to be finite on every process before each save. On SIGTERM the run saves once
    more at the end of the current optimizer step (every process agrees on which step) and stops with
    :class:`~lightning.pytorch.utilities.exceptions.SIGTERMException`."""

    def __init__(self, dirpath: Path, every_n_steps: int, keep: int) -> None:
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_steps,
            save_top_k=keep,
            monitor="step",
            mode="max",
            save_last="link",
        )
        self.sigterm = False
        self._step_seen = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._step_seen = trainer.global_step

        def on_sigterm(signum, frame) -> None:  # replaces Lightning's handler (which stops without saving)
            if not self.sigterm and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)  # the ranks Lightning started from this process
            self.sigterm = True

        signal.signal(signal.SIGTERM, on_sigterm)  # Lightning restores the original handler at teardown

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._step_seen:  # an optimizer step has just finished
            self._step_seen = trainer.global_step
            if trainer.strategy.reduce_boolean_decision(self.sigterm, all=False):
                self.save_now(trainer)
                say(f"[dsmoe.train] SIGTERM: saved {self.last_model_path} at step {trainer.global_step}")
                raise SIGTERMException()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def save_now(self, trainer: L.Trainer) -> None:
        """A resume checkpoint at the current step (nothing if one was saved at this step already)."""
        if self._last_global_step_saved == trainer.global_step:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if not all_finite(trainer.lightning_module):
            last = self._last_checkpoint_saved or "none yet"
            raise NonFiniteError(
                f"the weights are not finite at step {trainer.global_step}: not saving a checkpoint. The last finite "
                f"checkpoint is {last}; lower optim.lr or check the data, then resume=last"
            )
        super()._save_checkpoint(trainer, filepath)

    def _should_remove_checkpoint(self, trainer: L.Trainer, previous: str, current: str) -> bool:
        # Lightning keeps the checkpoint a run resumed from forever; once a newer one is written (atomically) it is
        # rotated out like any other
        return previous != current and Path(self.dirpath).absolute() in Path(previous).absolute().parents
