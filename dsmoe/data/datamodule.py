"""The LightningDataModule of continued pre-training (paper §5.1).

Training: one endless mixed stream per rank (``dsmoe.data.stream``), read by ``num_workers`` DataLoader workers.
Validation: one DataLoader per source, in the order of ``val_source_names``, over this rank's share of the packed
held-out documents (``validation_share``: the same windows, each once, on any number of ranks).

Exact resumption: each worker attaches the stream's state to every batch it collates; ``on_before_batch_transfer``
(called by Lightning's training loop for the batch it is about to train on, after prefetching, so never for a
batch that is only prefetched) takes it off and records it. ``state_dict`` (called on every rank when a
checkpoint is dumped) gathers the ranks' states, so each rank restores its own.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dsmoe.data.config import DataConfig
from dsmoe.data.corpus import build_corpus
from dsmoe.data.reader import assigned_files
from dsmoe.data.stream import STREAM_STATE, MixtureStream, PreparedSource, collate_with_state, prepare_sources
from dsmoe.data.tokens import packed_eval_windows

STATE_FORMAT = 3  # 3: training also skips rows that repeat a held-out text (2 did not; 1 replayed batches)


IGNORE_INDEX = -100  # labels of a filler window: no loss, no perplexity, no activation counts


class _Windows(Dataset):
    """Packed windows as {input_ids, labels}; ``fill`` more all-ignored windows after them."""

    def __init__(self, windows: torch.Tensor, fill: int = 0) -> None:
        self.windows, self.fill = windows, fill

    def __len__(self) -> int:
        return len(self.windows) + self.fill

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < len(self.windows):
            window = self.windows[index]
            return {"input_ids": window, "labels": window.clone()}
        width = self.windows.shape[-1] if self.windows.dim() == 2 else 1
        return {"input_ids": torch.zeros(width, dtype=torch.long), "labels": torch.full((width,), IGNORE_INDEX)}


def validation_share(windows: torch.Tensor, limit: int | float, micro_batch_size: int, rank: int, world: int):
    """This rank's validation windows of one source: the first ``limit`` × ``micro_batch_size`` windows (an int) or
    that fraction of them (a float), dealt round-robin over the ranks, each share evened out by filler windows so
    every rank runs the same number of batches (FSDP's forwards are collectives). The windows evaluated, and so
    ``val/ppl``, are the same for any number of ranks; each is counted once."""
    total = len(windows)
    kept = min(total, limit * micro_batch_size) if isinstance(limit, int) else math.ceil(limit * total)
    share = windows[:kept][rank::world]
    return _Windows(share, fill=math.ceil(kept / world) - len(share))


def _gather(local: Any) -> list[Any] | None:
    """Every rank's ``local`` (rank order) when a process group of several ranks runs, else None."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


class PretrainDataModule(L.LightningDataModule):
    """Training: one endless mixed stream per rank. Validation: one DataLoader per source, in the order
    of ``val_source_names``, over the packed held-out documents (``val_windows``; the documents themselves
    are ``val_documents``)."""

    def __init__(self, config: DataConfig, tokenizer, limit_val_batches: int | float = 1.0) -> None:
        super().__init__()
        self.config, self.tokenizer, self.limit_val_batches = config, tokenizer, limit_val_batches
        self.val_source_names = [s.name for s in config.sources]
        self.val_windows: list[torch.Tensor] = []
        self.val_documents: list[list[str]] = []
        self.sources: list[PreparedSource] = []
        self.rank, self.world_size = 0, 1
        self._workers: dict[int, dict[str, Any]] = {}  # logical worker -> state after its last trained batch
        self._next_worker = 0
        self._loaded: dict[str, Any] | None = None

    # ------------------------------------------------------------ preparation

    def prepare_data(self) -> None:
        """Build the embedded corpus once per node, before any rank reads it."""
        domains = [s.embedded_domain for s in self.config.sources if s.embedded_domain is not None]
        if domains:
            build_corpus(domains)

    def _prepare(self) -> None:
        if self.sources:
            return
        self.sources, self.val_documents = prepare_sources(self.config)
        cfg = self.config
        for source, held_out in zip(cfg.sources, self.val_documents, strict=True):
            windows = packed_eval_windows(self.tokenizer, held_out, cfg.seq_len)
            if cfg.val_docs_per_source and len(windows) == 0:
                raise ValueError(
                    f"source {source.name!r}: its {cfg.val_docs_per_source} held-out documents fill no window of "
                    f"{cfg.seq_len + 1} tokens; raise val_docs_per_source or lower seq_len"
                )
            self.val_windows.append(windows)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        self._prepare()

    # ------------------------------------------------------------ loaders

    def _warn_shared_files(self, num_readers: int) -> None:
        for source in self.sources:
            _, deals = assigned_files(len(source.files.files), 0, num_readers)
            if deals:
                warnings.warn(
                    f"source {source.files.name!r} has {len(source.files.files)} file(s) for {num_readers} readers "
                    f"(ranks x DataLoader workers): every reader reads all its files and keeps 1 document in "
                    f"{num_readers}. Use at most {len(source.files.files)} readers to read disjoint files.",
                    stacklevel=2,
                )

    def train_dataloader(self) -> DataLoader:
        self._prepare()
        cfg = self.config
        workers = max(cfg.num_workers, 1)
        if self.rank == 0:
            self._warn_shared_files(self.world_size * workers)
        resume = self._restore()
        if resume is not None:
            resume = {"num_workers": workers, **resume}
        return DataLoader(
            MixtureStream(cfg, self.tokenizer, self.sources, self.rank, self.world_size, resume),
            batch_size=cfg.micro_batch_size,
            num_workers=cfg.num_workers,
            collate_fn=collate_with_state,
            persistent_workers=cfg.num_workers > 0,
        )

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per source over this rank's share (``validation_share``). Its sampler is already a
        DistributedSampler of one replica, so Lightning does not add its own, which pads by repeating windows."""
        self._prepare()
        loaders = []
        for windows in self.val_windows:
            share = validation_share(
                windows, self.limit_val_batches, self.config.micro_batch_size, self.rank, self.world_size
            )
            sampler = DistributedSampler(share, num_replicas=1, rank=0, shuffle=False)
            loaders.append(DataLoader(share, batch_size=self.config.micro_batch_size, sampler=sampler))
        return loaders

    # ------------------------------------------------------------ exact resumption

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Take the stream state off a training batch; record it when the batch is about to be trained on."""
        if isinstance(batch, dict) and STREAM_STATE in batch:
            state = batch.pop(STREAM_STATE)
            if self.trainer is not None and self.trainer.training:
                self.record(state)
        return batch

    def record(self, state: dict[str, Any]) -> None:
        """Note that the batch with this stream state was consumed (for loops that do not use Lightning's hook)."""
        worker = state["worker"]
        self._workers[worker] = {k: v for k, v in state.items() if k != "worker"}
        self._next_worker = (worker + 1) % max(self.config.num_workers, 1)

    def state_dict(self) -> dict[str, Any]:
        """The positional stream state of every rank (gathered: Lightning calls this on every rank)."""
        self._restore()
        local = {"workers": dict(self._workers), "next_worker": self._next_worker}
        gathered = _gather(local)
        ranks = dict(enumerate(gathered)) if gathered is not None else {self.rank: local}
        return {
            "format": STATE_FORMAT,
            "config": self.config.stream_fingerprint(),
            "files": self.resolved_files(),
            "world_size": self.world_size,
            "num_workers": max(self.config.num_workers, 1),
            "ranks": ranks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep the checkpoint's stream state; each rank takes its own when its training loader is built."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"the checkpoint's data state was written by an older data stream (format {state.get('format', 1)}, "
                f"this one reads {STATE_FORMAT}: its positions count other documents): it cannot be continued "
                "exactly; start the run afresh"
            )
        saved, current = state["config"], self.config.stream_fingerprint()
        differ = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        if differ:
            raise ValueError(
                f"the checkpoint's data stream was made with different data settings {differ} "
                f"(checkpoint: { {k: saved.get(k) for k in differ} }, now: { {k: current.get(k) for k in differ} }); "
                "resume with the same data config or start a new run"
            )
        self._loaded = state

    def resolved_files(self) -> dict[str, list[str]]:
        """Each source's files in stored order (hub files as URLs with the commit they resolved at): the positions
        index into them."""
        self._prepare()
        return {source.files.name: list(source.files.files) for source in self.sources}

    def _check_same_files(self, saved: dict[str, list[str]]) -> None:
        """Refuse a resume whose sources resolve to other files than the checkpoint's: a data_files glob that
        matches a file added, removed or renamed since (or a hub dataset read at a newer commit) would continue
        another stream, and could redraw the held-out documents from files that were trained on."""
        current = self.resolved_files()
        for name in sorted(saved.keys() | current.keys()):
            before, now = saved.get(name, []), current.get(name, [])
            if before != now:
                added, gone = sorted(set(now) - set(before)), sorted(set(before) - set(now))
                change = (
                    "; ".join(
                        f"{what} {len(paths)}: {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}"
                        for what, paths in (("added", added), ("gone", gone))
                        if paths
                    )
                    or "the same files in another order"
                )
                raise ValueError(
                    f"source {name!r} reads other files than the checkpoint's data stream ({len(before)} then, "
                    f"{len(now)} now; {change}): it cannot be continued exactly; restore the files or start a new run"
                )

    def _restore(self) -> dict[str, Any] | None:
        """This rank's part of a loaded state (once), checked against the current world size and workers."""
        if self._loaded is None:
            return None if not self._workers else {"workers": dict(self._workers), "next_worker": self._next_worker}
        state, self._loaded = self._loaded, None
        if "files" in state:  # checkpoints from before it was recorded: not checked
            self._check_same_files(state["files"])
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        workers = max(self.config.num_workers, 1)
        if (state["world_size"], state["num_workers"]) != (self.world_size, workers):
            raise ValueError(
                f"the checkpoint's data stream was read by {state['world_size']} rank(s) x {state['num_workers']} "
                f"DataLoader worker(s); this run has {self.world_size} x {workers}. The stream cannot be continued "
                "exactly with another layout: resume with the same devices and data.num_workers, or start a new run"
            )
        if self.rank not in state["ranks"]:
            raise ValueError(f"the checkpoint holds no data stream state for rank {self.rank}")
        mine = state["ranks"][self.rank]
        self._workers, self._next_worker = dict(mine["workers"]), mine["next_worker"]
        return {"workers": dict(self._workers), "next_worker": self._next_worker}
