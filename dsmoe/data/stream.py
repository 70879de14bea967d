"""The training stream: a token-share mixture of sources, tokenised in batches and packed into windows, whose
state after every window is small and positional, so a resumed run continues it exactly without replay.

* Mixture: ``weight`` is a source's share of *training tokens* (normalised). The next document always comes from
  the source furthest below its share, so realised shares track the weights to within one document.
* Packing: the token stream is cut into consecutive windows of ``seq_len + 1`` tokens (``labels = input_ids``; HF
  models shift labels internally), a separator after every document.
* State after a window: each source's :class:`~dsmoe.data.reader.Position` of its next unused document, the
  mixture's token counters, and ``carry`` = (source, tokens already used) of the document the next window starts
  in (that source's position then points at this document, which a resumed stream re-reads and re-tokenises).
  When a window is cut, what is left of the buffer always lies inside the last document read, so this is exact.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dsmoe.data.config import DataConfig
from dsmoe.data.files import SourceFiles
from dsmoe.data.holdout import validation_sample
from dsmoe.data.reader import Position, SourceReader, text_digest
from dsmoe.data.sources import resolve_files
from dsmoe.data.tokens import document_separator_id, tokenize_documents

TOKENIZE_BATCH = 64  # documents per tokenizer call and source
STREAM_STATE = "stream_state"  # batch key of the state a DataLoader worker attaches to each training batch


@dataclass(frozen=True)
class PreparedSource:
    """What a reader needs of a source: its files, its weight and the (file, row) pairs held out for validation."""

    files: SourceFiles
    weight: float
    held_out: frozenset[tuple[int, int]]
    held_out_texts: frozenset[bytes] = frozenset()  # text_digest of every source's held-out documents


def prepare_sources(config: DataConfig) -> tuple[list[PreparedSource], list[list[str]]]:
    """Resolve every source's files and draw its validation sample; returns the sources and the held-out texts."""
    prepared, held_out_texts = [], []
    for source in config.sources:
        files = resolve_files(source)
        held = validation_sample(
            files, config.val_docs_per_source, config.val_pool_docs, config.val_seed, config.max_unusable_fraction
        )
        prepared.append(PreparedSource(files, source.weight, held.positions))
        held_out_texts.append(held.texts)
    digests = frozenset(text_digest(text) for texts in held_out_texts for text in texts)  # of all sources
    return [dataclasses.replace(p, held_out_texts=digests) for p in prepared], held_out_texts


class WindowStream:
    """Endless packed windows of one reader (rank × worker), each with the stream's state after it."""

    def __init__(
        self,
        sources: Sequence[PreparedSource],
        tokenizer,
        config: DataConfig,
        reader: int,
        num_readers: int,
        state: dict[str, Any] | None = None,
    ) -> None:
        if state is not None and len(state["positions"]) != len(sources):
            raise ValueError(f"stream state has {len(state['positions'])} sources, the config {len(sources)}")
        self.readers = [
            SourceReader(
                s.files,
                reader,
                num_readers,
                s.held_out,
                config.seed,
                config.shuffle_buffer,
                config.max_unusable_fraction,
                Position.from_list(state["positions"][i]) if state is not None else None,
                s.held_out_texts,
            )
            for i, s in enumerate(sources)
        ]
        total = sum(s.weight for s in sources)
        self.shares = [s.weight / total for s in sources]
        self.tokenizer, self.separator = tokenizer, document_separator_id(tokenizer)
        self.window = config.seq_len + 1
        self.queues: list[deque[tuple[Position, list[int]]]] = [deque() for _ in sources]
        self.tokens = [int(t) for t in state["tokens"]] if state is not None else [0] * len(sources)
        self.buffer: list[int] = []
        self.last: tuple[int, Position, int] | None = None  # (source, position, length) of the last document read
        if state is not None and state["carry"] is not None:
            source, used = state["carry"]
            position, doc = self._pop(source)
            self.buffer, self.last = doc[used:], (source, position, len(doc))

    @property
    def rows_read(self) -> int:
        """Rows read from files by all sources of this reader (skipped ones included)."""
        return sum(r.rows_read for r in self.readers)

    def _pop(self, source: int) -> tuple[Position, list[int]]:
        queue = self.queues[source]
        if not queue:
            docs = self.readers[source].next_documents(TOKENIZE_BATCH)
            ids = tokenize_documents(self.tokenizer, [text for _, text in docs], self.separator)
            queue.extend(zip((position for position, _ in docs), ids, strict=True))
        return queue.popleft()

    def _next_source(self) -> int:
        seen = sum(self.tokens)
        return max(range(len(self.shares)), key=lambda k: (self.shares[k] * seen - self.tokens[k], self.shares[k]))

    def state(self) -> dict[str, Any]:
        """The state after the last window: a stream built from it yields the windows that follow."""
        positions = [
            (queue[0][0] if queue else reader.position).to_list()
            for queue, reader in zip(self.queues, self.readers, strict=True)
        ]
        carry = None
        if self.buffer:
            source, position, length = self.last
            positions[source], carry = position.to_list(), [source, length - len(self.buffer)]
        return {"positions": positions, "tokens": list(self.tokens), "carry": carry}

    def __iter__(self) -> Iterator[tuple[list[int], dict[str, Any]]]:
        while True:
            while len(self.buffer) < self.window:
                source = self._next_source()
                position, doc = self._pop(source)
                self.tokens[source] += len(doc)
                self.buffer.extend(doc)
                self.last = (source, position, len(doc))
            window = self.buffer[: self.window]
            del self.buffer[: self.window]
            yield window, self.state()


class MixtureStream(IterableDataset):
    """A rank's training windows, split among its DataLoader workers; yields (window, state) pairs.

    Reader = ``rank * num_workers + logical worker``. ``resume`` = ``{"num_workers", "next_worker", "workers":
    {logical worker: state}}``: physical worker p continues logical worker ``(p + next_worker) % num_workers``,
    because a new DataLoader iterator hands out its first batch from physical worker 0."""

    def __init__(
        self,
        config: DataConfig,
        tokenizer,
        sources: Sequence[PreparedSource],
        rank: int = 0,
        world_size: int = 1,
        resume: dict[str, Any] | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.config, self.tokenizer, self.sources = config, tokenizer, list(sources)
        self.rank, self.world_size, self.resume = rank, world_size, resume

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        states, first = {}, 0
        if self.resume is not None:
            if self.resume["num_workers"] != num_workers:
                raise ValueError(
                    f"the stream state is for {self.resume['num_workers']} DataLoader workers, this loader has "
                    f"{num_workers}"
                )
            states, first = self.resume["workers"], self.resume["next_worker"]
        logical = (worker_id + first) % num_workers
        stream = WindowStream(
            self.sources,
            self.tokenizer,
            self.config,
            reader=self.rank * num_workers + logical,
            num_readers=self.world_size * num_workers,
            state=states.get(logical),
        )
        for window, state in stream:
            yield torch.tensor(window, dtype=torch.long), {"worker": logical, **state}


def collate(windows: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    input_ids = torch.stack(list(windows))
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def collate_with_state(items: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> dict[str, Any]:
    """A training batch plus, under STREAM_STATE, the stream's state after its last window (runs in the worker)."""
    return {**collate([window for window, _ in items]), STREAM_STATE: items[-1][1]}
