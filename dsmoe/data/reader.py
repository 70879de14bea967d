"""One reader's training documents of one source, shuffled, endless, with a small positional state.

Readers are the ranks × DataLoader workers (reader = rank * num_workers + worker). Sharding:

* a source with at least as many files as readers: reader r reads files r, r + R, r + 2R, ... (disjoint files);
* otherwise every reader reads every file and keeps row j of file i when (i + j) % R == r (disjoint documents,
  but each reader decodes everything: ``DataConfig`` users get a warning naming the source).

Held-out validation rows, given as (file index, row) pairs, are skipped, and so is any other row whose text is one of
the held-out texts (``text_digest``: no validation text is trained on, as the paper's sets do not intersect). Each
epoch reads the reader's files in a seeded order; its documents are cut into blocks of ``block_size`` (the first
block of epoch e > 0 is shorter by a seeded phase, so later epochs cut blocks elsewhere) and each block is permuted
by an RNG seeded from (seed, source, reader, epoch, block). A :class:`Position` therefore says where a document is
without storing any document: resuming re-reads one block from its start (at most one file is skipped through to
reach it).
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from dsmoe.data.files import DataFileError, SourceFiles, read_batches, text_values

UNUSABLE_CHECK_ROWS = 1000  # rows read before the unusable fraction is checked (it is also checked at each file end)


def text_digest(text: str) -> bytes:
    """A 128-bit digest of a document's text (held-out texts are compared by it)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass(frozen=True)
class Position:
    """Where a reader is: the next document is number ``offset`` of block ``block`` of ``epoch``, and that block's
    reading starts at row ``row`` of file number ``cursor`` in the epoch's file order."""

    epoch: int = 0
    cursor: int = 0
    row: int = 0
    block: int = 0
    offset: int = 0

    def to_list(self) -> list[int]:
        return [self.epoch, self.cursor, self.row, self.block, self.offset]

    @classmethod
    def from_list(cls, values: list[int]) -> Position:
        return cls(*map(int, values))


@dataclass
class UnusableRows:
    """Rows of a source without usable text, by reason, over the rows a reader examined."""

    rows: int = 0
    missing: int = 0  # field absent or null
    blank: int = 0  # empty or whitespace only

    @property
    def unusable(self) -> int:
        return self.missing + self.blank

    def count(self, text: str | None) -> bool:
        """Count one row; True if its text is usable."""
        self.rows += 1
        if text is None:
            self.missing += 1
            return False
        if not text.strip():
            self.blank += 1
            return False
        return True

    def describe(self) -> str:
        return (
            f"{self.unusable} of {self.rows} rows have no usable text "
            f"({self.missing} missing or null, {self.blank} empty or whitespace)"
        )

    def check(self, source: str, where: str, max_fraction: float) -> None:
        if self.rows and self.unusable / self.rows > max_fraction:
            raise DataFileError(
                f"source {source!r}: {self.describe()} in {where}, more than max_unusable_fraction={max_fraction}; "
                "check text_field and the files (or raise data.max_unusable_fraction)"
            )


def assigned_files(num_files: int, reader: int, num_readers: int) -> tuple[list[int], bool]:
    """The file indices a reader reads and whether it deals rows with the other readers (too few files)."""
    if not 0 <= reader < num_readers:
        raise ValueError(f"reader must be in [0, {num_readers}), got {reader}")
    if num_files >= num_readers:
        return list(range(reader, num_files, num_readers)), False
    return list(range(num_files)), True


class SourceReader:
    """Endless shuffled training documents of one source for one reader; ``position`` is its whole state."""

    def __init__(
        self,
        files: SourceFiles,
        reader: int,
        num_readers: int,
        held_out: frozenset[tuple[int, int]],
        seed: int,
        block_size: int,
        max_unusable_fraction: float,
        position: Position | None = None,
        held_out_texts: frozenset[bytes] = frozenset(),
    ) -> None:
        self.files, self.reader, self.num_readers, self.held_out = files, reader, num_readers, held_out
        self.held_out_texts = held_out_texts  # text_digest of every held-out document
        self.seed, self.block_size, self.max_unusable_fraction = seed, block_size, max_unusable_fraction
        self.assigned, self.deals = assigned_files(len(files.files), reader, num_readers)
        self.rows_read = 0  # rows pulled from files, skipped ones included (what a resume costs)
        self.unusable = UnusableRows()
        self._start(position or Position())

    # ------------------------------------------------------------ positions

    def _rng(self, *parts: object) -> random.Random:
        return random.Random(":".join(map(str, (self.seed, self.files.name, self.reader, *parts))))

    def _block_size(self, epoch: int, block: int) -> int:
        """Blocks of ``block_size``; after the first epoch the first block is shorter by a seeded phase in
        [1, block_size), so no later epoch cuts its blocks where the first one did."""
        if epoch == 0 or block > 0 or self.block_size == 1:
            return self.block_size
        return self.block_size - self._rng(epoch, "phase").randrange(1, self.block_size)

    def _start(self, position: Position) -> None:
        """Read the block ``position`` lies in and stand at its document ``offset``."""
        self.epoch, self.block = position.epoch, position.block
        self.order = list(self.assigned)
        self._rng(self.epoch, "files").shuffle(self.order)
        self._rows = self._kept_rows(position.cursor, position.row)
        self._load_block(position.cursor, position.row)
        if position.offset > len(self.docs):
            raise ValueError(f"source {self.files.name!r}: position {position} lies past its block's end")
        self.offset = position.offset

    @property
    def position(self) -> Position:
        """The position of the next document: a reader started there yields the same documents from then on."""
        return Position(self.epoch, *self._block_start, self.block, self.offset)

    # ------------------------------------------------------------ reading

    def _kept_rows(self, first: int, row: int) -> Iterator[tuple[int, int, str]]:
        """(cursor, row, text) of this reader's usable rows of the epoch, from row ``row`` of file number ``first``
        in the epoch's order on."""
        for cursor in range(first, len(self.order)):
            index, base, examined = self.order[cursor], 0, UnusableRows()
            for table in read_batches(self.files, index):
                n = table.num_rows
                self.rows_read += n
                start = max(row - base, 0)
                if self.deals:
                    start += (self.reader - index - base - start) % self.num_readers
                rows = list(range(start, n, self.num_readers if self.deals else 1))
                texts = text_values(table, self.files, index, rows) if rows else []
                for local, text in zip(rows, texts, strict=True):
                    if (index, base + local) in self.held_out:
                        continue
                    if text is not None and self.held_out_texts and text_digest(text) in self.held_out_texts:
                        continue
                    examined.count(text)
                    if self.unusable.count(text):
                        yield cursor, base + local, text
                    if self.unusable.rows % UNUSABLE_CHECK_ROWS == 0:
                        self._check_unusable(f"the rows reader {self.reader} has read")
                base += n
            if base == 0:
                raise DataFileError(f"{self.files.describe(index)}: the file is empty (no rows)")
            if base < row:
                raise ValueError(
                    f"{self.files.describe(index)} has {base} rows, fewer than the resume position's row {row}: "
                    "the file changed since the checkpoint"
                )
            if examined.unusable and self.epoch == 0:
                warnings.warn(f"{self.files.describe(index)}: {examined.describe()}; they are skipped", stacklevel=2)
            self._check_unusable(f"file {self.files.files[index]!r}")
            row = 0

    def _check_unusable(self, where: str) -> None:
        self.unusable.check(self.files.name, where, self.max_unusable_fraction)

    def _load_block(self, cursor: int, row: int) -> None:
        """Read up to one block of documents from (cursor, row) on (fewer at the epoch's end) and permute them."""
        self._block_start = (cursor, row)
        size = self._block_size(self.epoch, self.block)
        docs, self._head = [], (cursor, row)
        for cursor, row, text in self._rows:
            docs.append(text)
            self._head = (cursor, row + 1)
            if len(docs) == size:
                break
        else:
            self._head = (len(self.order), 0)
        self._rng(self.epoch, self.block).shuffle(docs)
        self.docs = docs

    def _next_block(self) -> None:
        """Move to the next block, or to the next epoch when the files are used up."""
        self.block, self.offset = self.block + 1, 0
        self._load_block(*self._head)
        if not self.docs:  # the epoch's files are used up
            self._start(Position(epoch=self.epoch + 1))
        if not self.docs:
            raise ValueError(
                f"source {self.files.name!r} has no training documents for reader {self.reader} of {self.num_readers} "
                f"(files {[self.files.files[i] for i in self.assigned]}): it needs more documents than it holds out "
                "for validation, texts that repeat a held-out one not counted (lower val_docs_per_source?)"
            )

    def next_documents(self, n: int) -> list[tuple[Position, str]]:
        """The next ``n`` documents, each with the position a reader must start at to yield it next."""
        out = []
        while len(out) < n:
            if self.offset == len(self.docs):
                self._next_block()
            out.append((self.position, self.docs[self.offset]))
            self.offset += 1
        return out
