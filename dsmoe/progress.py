"""Training progress as plain lines, for output that is not a terminal (a cluster job's log file, nohup, a pipe).

Lightning's Rich progress bar draws nothing there until training ends (Rich renders a live display to a file only
when it stops), so a multi-day run would log no progress at all. :class:`ProgressLines` replaces it there.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

MIN_SECONDS = 30.0  # between two step lines: 1B on 8 GPUs is estimated at ~0.2 s per step (FLOPs), not measured


class ProgressLines(ProgressBar):
    """A line on every ``every``-th optimizer step at least ``min_seconds`` after the last line (and on the last
    step): step, tokens, the progress-bar metrics (LM loss, mean active experts), tokens/s and the time left; one
    line after each validation. Rank 0 only."""

    def __init__(self, every: int, tokens_per_step: int, min_seconds: float = MIN_SECONDS) -> None:
        super().__init__()
        self.every, self.tokens_per_step, self.min_seconds = every, tokens_per_step, min_seconds
        self._enabled = True
        self._start_time, self._start_step, self._last_step, self._last_time = 0.0, 0, -1, float("-inf")

    @property
    def is_enabled(self) -> bool:  # LightningModule.print asks
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _show(self, trainer: L.Trainer) -> bool:
        return self._enabled and trainer.is_global_zero

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_time, self._start_step = time.monotonic(), trainer.global_step
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step, total, now = trainer.global_step, trainer.max_steps, time.monotonic()
        if not self._show(trainer) or step == self._last_step:
            return
        if step != total and (step % self.every or now - self._last_time < self.min_seconds):
            return
        self._last_step, self._last_time = step, now
        elapsed = now - self._start_time
        rate = (step - self._start_step) / max(elapsed, 1e-9)  # optimizer steps per second since this start
        left = timedelta(seconds=round((total - step) / rate)) if rate > 0 else "?"
        line = (
            f"step {step}/{total} ({100 * step / total:.1f}%), {step * self.tokens_per_step:,} tokens"
            f"{self._metrics(trainer, 'train/')} | {rate * self.tokens_per_step:,.0f} tokens/s, "
            f"{timedelta(seconds=round(elapsed))} elapsed, {left} left"
        )
        self.print(f"[dsmoe.train] {line}", flush=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._show(trainer) and not trainer.sanity_checking:
            shown = {  # PPL overall and per source, activation; not the per-layer values
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and "/layer_" not in k
            }
            self.print(f"[dsmoe.train] validation at step {trainer.global_step}{_listed(shown, 'val/')}", flush=True)

    def _metrics(self, trainer: L.Trainer, prefix: str) -> str:
        return _listed(self.get_metrics(trainer, trainer.lightning_module), prefix)


def _listed(metrics: dict[str, Any], prefix: str) -> str:
    """ ", name value" for each metric whose name starts with ``prefix`` (shown without it)."""
    return "".join(f", {k.removeprefix(prefix)} {v:.4g}" for k, v in metrics.items() if k.startswith(prefix))


def progress_callbacks(every: int, tokens_per_step: int) -> list[ProgressBar]:
    """Lines (:class:`ProgressLines`) where stdout is not a terminal; none elsewhere: Lightning's own bar."""
    return [] if sys.stdout.isatty() else [ProgressLines(every, tokens_per_step, MIN_SECONDS)]
