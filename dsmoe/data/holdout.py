"""The validation hold-out (paper §5.1: "randomly sampled 5,000 non-overlapping instances from each dataset").

A seeded random sample of ``n_docs`` documents from the first ``pool_docs`` usable documents of the source in
stored order. Identical on every rank and worker (it depends on the files, ``n_docs``, ``pool_docs`` and the
seed only), and identified by (file index, row) so that training skips exactly these rows.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from dsmoe.data.files import SourceFiles, read_batches, text_values
from dsmoe.data.reader import UnusableRows


@dataclass(frozen=True)
class HeldOut:
    """A source's held-out documents, in stored order, and where they are."""

    texts: list[str]
    positions: frozenset[tuple[int, int]]
    pool_docs: int  # usable documents in the pool (fewer than asked when the source is that small)


def first_usable(files: SourceFiles, limit: int, unusable: UnusableRows) -> Iterator[tuple[tuple[int, int], str]]:
    """The first ``limit`` usable documents of the source in stored order, with their (file, row)."""
    found = 0
    for index in range(len(files.files)):
        base = 0
        for table in read_batches(files, index):
            for row, text in enumerate(text_values(table, files, index)):
                if unusable.count(text):
                    yield (index, base + row), text
                    found += 1
                    if found == limit:
                        return
            base += table.num_rows


def _draw(source: str, seed: int, population: int, n_docs: int) -> set[int]:
    return set(random.Random(f"{seed}:{source}:validation").sample(range(population), n_docs))


def validation_sample(
    files: SourceFiles, n_docs: int, pool_docs: int, seed: int, max_unusable_fraction: float
) -> HeldOut:
    """``n_docs`` documents drawn without replacement by ``random.Random(f"{seed}:{source}:validation")`` from
    the pool. The source must hold more than ``n_docs`` documents, or nothing would be left for training."""
    if n_docs == 0:
        return HeldOut([], frozenset(), 0)
    unusable = UnusableRows()
    chosen = _draw(files.name, seed, pool_docs, n_docs)
    found, picked = 0, []  # only the drawn texts are kept: the pool of a hub source is ~50k documents
    for k, (pos, text) in enumerate(first_usable(files, pool_docs + 1, unusable)):  # one past the pool: any left?
        found = k + 1
        if k in chosen:
            picked.append((pos, text))
    unusable.check(files.name, f"the first {unusable.rows} rows", max_unusable_fraction)
    if found <= n_docs:
        raise ValueError(
            f"source {files.name!r} has only {found} documents, not more than "
            f"val_docs_per_source={n_docs}: nothing would be left for training"
        )
    size = min(found, pool_docs)
    if size < pool_docs:  # a source smaller than the pool: draw from what it holds (and read it again: it is small)
        chosen = _draw(files.name, seed, size, n_docs)
        picked = [(pos, text) for k, (pos, text) in enumerate(first_usable(files, size, UnusableRows())) if k in chosen]
    return HeldOut([text for _, text in picked], frozenset(pos for pos, _ in picked), size)
