"""Data configuration: text sources (hub datasets, local files, the embedded corpus) and the DataModule's settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dsmoe.data.corpus import DOMAINS
from dsmoe.data.files import check_data_files, file_format

EMBEDDED_PREFIX, PAPER_PREFIX = "embedded:", "paper:"
VAL_POOL_FACTOR = 10  # default validation pool: this many times val_docs_per_source (see DataConfig)


@dataclass
class SourceConfig:
    """One text source. Either ``path`` (a hub dataset id or local dataset folder, or ``embedded:<domain>``) or
    ``data_files`` (local jsonl/json/parquet/txt/csv/arrow files or globs; a .txt file is one document)."""

    name: str
    weight: float = 1.0
    path: str | None = None
    config_name: str | None = None
    data_dir: str | None = None
    split: str = "train"
    data_files: list[str] | str | None = None
    text_field: str = "text"
    streaming: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"source name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.weight, (int, float)) or isinstance(self.weight, bool) or not self.weight > 0:
            raise ValueError(f"source {self.name!r}: weight must be a positive number, got {self.weight!r}")
        if (self.path is None) == (self.data_files is None):
            raise ValueError(
                f"source {self.name!r}: give exactly one of path (hub id or 'embedded:<domain>') and data_files; "
                f"got path={self.path!r}, data_files={self.data_files!r}"
            )
        if self.embedded_domain is not None and self.embedded_domain not in DOMAINS:
            raise ValueError(
                f"source {self.name!r}: unknown embedded domain {self.embedded_domain!r}; choose from {list(DOMAINS)}"
            )
        if self.data_files is not None:
            if not self.file_patterns:
                raise ValueError(f"source {self.name!r}: data_files is empty")
            for pattern in self.file_patterns:
                file_format(pattern, self.name)  # fails early on an unknown suffix

    @property
    def embedded_domain(self) -> str | None:
        """The embedded corpus domain this source reads, or None."""
        if self.path is not None and self.path.startswith(EMBEDDED_PREFIX):
            return self.path.removeprefix(EMBEDDED_PREFIX)
        return None

    @property
    def file_patterns(self) -> list[str]:
        """``data_files`` as a list of paths or globs (empty for hub and embedded sources)."""
        if self.data_files is None:
            return []
        return [self.data_files] if isinstance(self.data_files, str) else [str(f) for f in self.data_files]

    @classmethod
    def from_obj(cls, obj: str | dict | SourceConfig) -> SourceConfig:
        """Build from a shorthand (``embedded:<domain>``, ``paper:<name>``), a dict of fields, or a dict
        with ``preset: <shorthand>`` plus fields that override the preset (e.g. ``weight``)."""
        if isinstance(obj, SourceConfig):
            return obj
        if isinstance(obj, str):
            return source_preset(obj)
        if not isinstance(obj, dict):
            raise ValueError(f"a source must be a shorthand string or a mapping, got {obj!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - fields - {"preset"})
        if unknown:
            raise ValueError(f"unknown source key(s) {unknown} in {obj!r}; allowed: {sorted(fields | {'preset'})}")
        overrides = {k: v for k, v in obj.items() if k != "preset"}
        if "preset" in obj:
            return dataclasses.replace(source_preset(obj["preset"]), **overrides)
        return cls(**overrides)


# The paper's hub sources (§5.1). The paper does not state mixture weights: equal shares here.
PAPER_SOURCES: dict[str, SourceConfig] = {
    "fineweb-edu": SourceConfig("fineweb-edu", path="HuggingFaceFW/fineweb-edu", config_name="sample-10BT"),
    "open-web-math": SourceConfig("open-web-math", path="open-web-math/open-web-math"),
    "starcoder": SourceConfig("starcoder", path="bigcode/starcoderdata", data_dir="python", text_field="content"),
    "cosmopedia": SourceConfig("cosmopedia", path="HuggingFaceTB/cosmopedia", config_name="web_samples_v2"),
}


def source_preset(shorthand: str) -> SourceConfig:
    """``embedded:<domain>`` or ``paper:<name>`` as a SourceConfig."""
    if shorthand.startswith(EMBEDDED_PREFIX):
        return SourceConfig(name=shorthand.removeprefix(EMBEDDED_PREFIX), path=shorthand)
    if shorthand.startswith(PAPER_PREFIX) and shorthand.removeprefix(PAPER_PREFIX) in PAPER_SOURCES:
        return dataclasses.replace(PAPER_SOURCES[shorthand.removeprefix(PAPER_PREFIX)])
    raise ValueError(
        f"unknown source shorthand {shorthand!r}; use 'embedded:<{'|'.join(DOMAINS)}>' "
        f"or 'paper:<{'|'.join(PAPER_SOURCES)}>'"
    )


def corpus_sources(weights: dict[str, float] | None = None) -> list[SourceConfig]:
    """``SourceConfig``s for the embedded corpus (equal weights unless ``weights`` maps domain -> weight)."""
    weights = dict(weights) if weights is not None else dict.fromkeys(DOMAINS, 1.0)
    unknown = sorted(set(weights) - set(DOMAINS))
    if unknown:
        raise ValueError(f"unknown corpus domain(s) {unknown} in weights; choose from {list(DOMAINS)}")
    return [SourceConfig(name=d, weight=w, path=f"{EMBEDDED_PREFIX}{d}") for d, w in weights.items()]


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
        self.sources = [SourceConfig.from_obj(s) for s in self.sources]
        if not self.sources:
            raise ValueError("DataConfig.sources is empty: give at least one source")
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
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
                bound = f" >= {low}" if low is not None else ""
                raise ValueError(f"DataConfig.{key} must be an integer{bound}, got {value!r}")
        if self.val_pool_docs is None:
            self.val_pool_docs = VAL_POOL_FACTOR * self.val_docs_per_source
        if (
            not isinstance(self.val_pool_docs, int)
            or isinstance(self.val_pool_docs, bool)
            or self.val_pool_docs < self.val_docs_per_source
        ):
            raise ValueError(
                f"DataConfig.val_pool_docs must be an integer >= val_docs_per_source={self.val_docs_per_source} "
                f"(or null for {VAL_POOL_FACTOR}x), got {self.val_pool_docs!r}"
            )
        fraction = self.max_unusable_fraction
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
            raise ValueError(f"DataConfig.max_unusable_fraction must be a number in [0, 1], got {fraction!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ValueError(f"unknown data config key(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**values)

    def check_files(self) -> dict[str, list[str]]:
        """Check every data file of every source before any model work starts; ``{source: files}``.
        Errors name the file and the source (see :func:`dsmoe.data.files.check_data_files`)."""
        return check_data_files(self)

    def stream_fingerprint(self) -> dict[str, Any]:
        """The settings that determine the training stream: a resumed run must have the same."""
        keys = ("seq_len", "micro_batch_size", "val_docs_per_source", "val_pool_docs", "val_seed", "seed")
        return {
            "sources": [dataclasses.asdict(s) for s in self.sources],
            **{k: getattr(self, k) for k in keys},
            "shuffle_buffer": self.shuffle_buffer,
        }
