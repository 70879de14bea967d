"""Data settings of the DataModule (DataConfig) and the check of every source's files before any model work."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsmoe.config_checks import reject_unknown_keys
from dsmoe.data.corpus import corpus_path
from dsmoe.data.files import SourceFiles, check_local_file
from dsmoe.data.sources import SourceConfig, resolve_files

VAL_POOL_FACTOR = 10  # default validation pool: this many times val_docs_per_source (see DataConfig)


@dataclass
class DataConfig:
    """Data settings (paper §5.1: seq_len 1024, 5,000 randomly sampled validation documents per source).

    * ``val_docs_per_source`` documents of each source are held out: a random sample (seeded by ``val_seed``,
      not by ``seed``, so every training seed is evaluated on the same documents) from the first
      ``val_pool_docs`` usable documents of the source in stored order (default ``10 × val_docs_per_source``).
      The pool bounds what setup reads: a 10B-token hub set cannot be read whole to draw a sample, and a pool
      ten times the sample keeps it a sparse random draw while costing one read of ~50k documents per source
      at the paper's 5,000.
    * ``seed`` orders the training documents (shuffle blocks of ``shuffle_buffer`` documents, file order).
    * ``max_unusable_fraction``: rows without usable text (text field missing or null, empty, whitespace) are
      skipped and counted per source; above this fraction the run stops with an error naming the source
      (default 1%: the paper's sources have essentially none, so more means a wrong ``text_field`` or file).
    """

    sources: list[SourceConfig]
    seq_len: int = 1024
    micro_batch_size: int = 8
    val_docs_per_source: int = 5000
    val_pool_docs: int | None = None
    val_seed: int = 0
    seed: int = 0
    num_workers: int = 0
    shuffle_buffer: int = 1000
    max_unusable_fraction: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.sources, (list, tuple)):
            raise ValueError(
                f"data.sources must be a list (of source mappings or shorthands such as 'embedded:math'), "
                f"got {self.sources!r}"
            )
        self.sources = [SourceConfig.from_obj(s) for s in self.sources]
        if not self.sources:
            raise ValueError("data.sources is empty: give at least one source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        for key, low in (
            ("seq_len", 1),
            ("micro_batch_size", 1),
            ("val_docs_per_source", 0),
            ("num_workers", 0),
            ("shuffle_buffer", 1),
            ("seed", None),
            ("val_seed", None),
        ):
            checked_int(key, getattr(self, key), low)
        if self.val_pool_docs is None:
            self.val_pool_docs = VAL_POOL_FACTOR * self.val_docs_per_source
        if (
            not isinstance(self.val_pool_docs, int)
            or isinstance(self.val_pool_docs, bool)
            or self.val_pool_docs < self.val_docs_per_source
        ):
            raise ValueError(
                f"data.val_pool_docs must be an integer >= val_docs_per_source={self.val_docs_per_source} "
                f"(or null for {VAL_POOL_FACTOR}x), got {self.val_pool_docs!r}"
            )
        fraction = self.max_unusable_fraction
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
            raise ValueError(f"data.max_unusable_fraction must be a number in [0, 1], got {fraction!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        reject_unknown_keys(values, {f.name for f in dataclasses.fields(cls)}, "data config key(s)")
        if "sources" not in values:
            raise ValueError(
                "data.sources is missing: give a list of sources, each a shorthand such as 'embedded:general' or a "
                "mapping such as {name: web, data_files: 'web/*.parquet'}"
            )
        return cls(**values)

    def check_files(self) -> dict[str, list[str]]:
        """Check every data file of every source before any model work starts; ``{source: files}``.
        Errors name the file and the source (see :func:`check_data_files`)."""
        return check_data_files(self)

    def stream_fingerprint(self) -> dict[str, Any]:
        """The settings that determine the training stream: a resumed run must have the same."""
        keys = ("seq_len", "micro_batch_size", "val_docs_per_source", "val_pool_docs", "val_seed", "seed")
        return {
            "sources": [dataclasses.asdict(s) for s in self.sources],
            **{k: getattr(self, k) for k in keys},
            "shuffle_buffer": self.shuffle_buffer,
        }


def checked_int(key: str, value: Any, low: int | None) -> int:
    """``value`` if it is an integer (>= ``low`` unless None); else a ValueError naming ``data.<key>``."""
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise ValueError(f"data.{key} must be an integer{bound}, got {value!r}")
    return value


def data_seq_len(data: Mapping[str, Any]) -> int:
    """seq_len of a ``data`` config section (default 1024), checked as :class:`DataConfig` checks it."""
    return checked_int("seq_len", data.get("seq_len", DataConfig.seq_len), 1)


def check_data_files(config: DataConfig) -> dict[str, list[str]]:
    """Check, before any model work, that every source resolves and that every local file exists, is non-empty
    and readable (parquet: its footer; jsonl: UTF-8 and a first record with the text field). Hub sources are
    checked as far as the hub's file listing allows without downloading data; the embedded corpus only once built.
    Returns ``{source: files}``."""
    resolved = {}
    for source in config.sources:
        if source.embedded_domain is not None:  # built by PretrainDataModule.prepare_data (once per node)
            files = SourceFiles(source.name, "json", (str(corpus_path(source.embedded_domain)),), source.text_field)
            local = Path(files.files[0]).exists()
        else:
            files = resolve_files(source)
            local = source.data_files is not None or Path(source.path).is_dir()
        if local:
            for index in range(len(files.files)):
                check_local_file(files, index)
        resolved[source.name] = list(files.files)
    return resolved
