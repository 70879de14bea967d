"""Text sources: what a source is (a hub dataset, local files or the embedded corpus; shorthands and the paper's
presets) and the data files it resolves to."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from dataclasses import dataclass

from huggingface_hub.utils import HFValidationError, validate_repo_id

from dsmoe.config_checks import reject_unknown_keys
from dsmoe.data.corpus import DOMAINS, build_corpus
from dsmoe.data.files import DataFileError, SourceFiles, file_format

EMBEDDED_PREFIX, PAPER_PREFIX = "embedded:", "paper:"


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
    revision: str | None = None  # a hub dataset's commit (branch or tag); None: its current one

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
        if self.revision is not None and not self.is_hub:
            raise ValueError(f"source {self.name!r}: revision={self.revision!r} is for hub datasets only")
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
    def is_hub(self) -> bool:
        """Whether the source is read from the hub (not a local folder, files or the embedded corpus)."""
        if self.path is None or self.embedded_domain is not None or os.path.isdir(os.path.expanduser(self.path)):
            return False
        try:
            validate_repo_id(self.path)  # "/data/x", "./x", "~/x", "a/b/c": a path, missing here
        except HFValidationError:
            return False
        return True

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
        reject_unknown_keys(obj, fields | {"preset"}, "source key(s)", f" in {obj!r}")
        overrides = {k: v for k, v in obj.items() if k != "preset"}
        if "preset" in obj:
            return dataclasses.replace(source_preset(obj["preset"]), **overrides)
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [key for key in required if key not in overrides]
        if missing:
            raise ValueError(
                f"source {obj!r} lacks required key(s) {missing}: a source mapping needs name and one of path or "
                "data_files (or preset: <shorthand>)"
            )
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
    if isinstance(shorthand, str) and shorthand.startswith(EMBEDDED_PREFIX):
        return SourceConfig(name=shorthand.removeprefix(EMBEDDED_PREFIX), path=shorthand)
    paper = shorthand.removeprefix(PAPER_PREFIX) if isinstance(shorthand, str) else None
    if paper in PAPER_SOURCES and shorthand.startswith(PAPER_PREFIX):
        return dataclasses.replace(PAPER_SOURCES[paper])
    raise ValueError(
        f"unknown source shorthand {shorthand!r}; use 'embedded:<{'|'.join(DOMAINS)}>' "
        f"or 'paper:<{'|'.join(PAPER_SOURCES)}>'"
    )


def _expand(pattern: str, source: str) -> list[str]:
    if glob.has_magic(pattern):
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise DataFileError(f"source {source!r}: no file matches {pattern!r}")
        return matches
    return [os.path.expanduser(pattern)]


def _no_duplicates(files: list[str], source: SourceConfig) -> None:
    """Refuse a file that data_files lists twice (also through overlapping globs): its documents would train twice."""
    seen = set()
    for f in files:
        path = os.path.abspath(f)
        if path in seen:
            raise DataFileError(
                f"source {source.name!r}: data_files {source.file_patterns} list {f!r} more than once (its documents "
                "would be read twice); list each file once"
            )
        seen.add(path)


def _one_format(files: list[str], source: str) -> str:
    formats = {file_format(f, source) for f in files}
    if len(formats) > 1:
        raise DataFileError(f"source {source!r} mixes file formats {sorted(formats)}: split it into sources")
    return formats.pop()


def _local_config_files(source: SourceConfig) -> list[str]:
    """The files of a config of a local copy of a hub dataset (``hf download --local-dir``), from the configs its
    README.md lists, as the hub reads them. (``datasets`` infers a local copy's format from its *first* config's
    files, which ``--include`` of another config did not download: fineweb-edu's first is ``default``.)"""
    from datasets.data_files import DataFilesList, sanitize_patterns
    from huggingface_hub.repocard import metadata_load

    folder = os.path.expanduser(source.path)
    try:
        configs = (metadata_load(os.path.join(folder, "README.md")) or {}).get("configs") or []
    except FileNotFoundError:
        raise DataFileError(
            f"source {source.name!r}: {source.path!r} has no README.md, which names a hub dataset's configs: copy it "
            "with the files (hf download ... --include README.md)"
        ) from None
    config = next((c for c in configs if c.get("config_name") == source.config_name), None)
    if config is None:
        raise DataFileError(
            f"source {source.name!r}: the README.md of {source.path!r} has no config {source.config_name!r}; "
            f"its configs are {[c.get('config_name') for c in configs]}"
        )
    try:
        patterns = sanitize_patterns(config.get("data_files") or []).get(source.split)
    except ValueError as err:
        raise DataFileError(f"source {source.name!r}: config {source.config_name!r} of {source.path!r}: {err}") from err
    if not patterns:
        raise DataFileError(
            f"source {source.name!r}: config {source.config_name!r} of {source.path!r} lists no files for split "
            f"{source.split!r}"
        )
    base = os.path.join(folder, config.get("data_dir") or "", source.data_dir or "")
    files = list(DataFilesList.from_patterns(patterns, base_path=base))
    if not files:
        raise DataFileError(
            f"source {source.name!r}: no file of config {source.config_name!r} ({patterns}) is in {source.path!r}: "
            "download them (hf download ... --include <these patterns>)"
        )
    return files


def _hub_files(source: SourceConfig) -> tuple[str, list[str]]:
    """The packaged builder name and data file URLs of a hub dataset (or local dataset folder): metadata only."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(
            source.path, name=source.config_name, data_dir=source.data_dir, revision=source.revision
        )
    except Exception as err:  # noqa: BLE001 - any failure here means the dataset cannot be found or reached
        hint = ""
        if source.is_hub:  # e.g. a node without internet
            hint = (
                f"; without hub access, download it where there is (`hf download --repo-type dataset {source.path} "
                "--local-dir DIR`, --include this config's files and README.md) and give the source `path: DIR` "
                '(README, "Machines without internet")'
            )
        raise DataFileError(
            f"source {source.name!r}: cannot resolve dataset {source.path!r} (config {source.config_name!r}, "
            f"data_dir {source.data_dir!r}): {type(err).__name__}: {err}{hint}"
        ) from err
    data_files = builder.config.data_files or {}
    if source.split not in data_files:
        raise DataFileError(
            f"source {source.name!r}: dataset {source.path!r} has no split {source.split!r}; "
            f"its splits are {sorted(map(str, data_files))}"
        )
    files = [str(f) for f in data_files[source.split]]
    if not files:
        raise DataFileError(f"source {source.name!r}: dataset {source.path!r} lists no files for {source.split!r}")
    return builder.name, files


HUB_FILE = re.compile(r"^hf://datasets/[^@]+@([0-9a-f]{40})/")


def hub_commit(source: SourceConfig) -> str | None:
    """The commit a hub source's files are read at now (its revision resolved; the hub's listing names it in every
    file's URL), or None where the listing does not say."""
    _, files = _hub_files(source)
    match = HUB_FILE.match(files[0])
    return match.group(1) if match else None


def resolve_files(source: SourceConfig) -> SourceFiles:
    """The source's files and format. The embedded corpus is built if needed; hub ids are resolved from
    the hub's file listing without downloading data."""
    if source.embedded_domain is not None:
        fmt, files = "json", [str(build_corpus([source.embedded_domain])[source.embedded_domain])]
    elif source.data_files is not None:
        files = [f for pattern in source.file_patterns for f in _expand(pattern, source.name)]
        _no_duplicates(files, source)
        fmt = _one_format(files, source.name)
    elif not source.is_hub and not os.path.isdir(os.path.expanduser(source.path)):
        if os.path.isfile(os.path.expanduser(source.path)):
            raise DataFileError(
                f"source {source.name!r}: path {source.path!r} is a file; path names a folder (or a hub id), "
                f"files go in data_files: [{source.path!r}]"
            )
        raise DataFileError(
            f"source {source.name!r}: no folder {source.path!r} on this machine (path names a folder; files go in "
            "data_files; a run on several nodes needs them on a filesystem every node sees)"
        )
    elif source.config_name is not None and not source.is_hub:
        files = _local_config_files(source)
        fmt = _one_format(files, source.name)
    else:
        fmt, files = _hub_files(source)
    return SourceFiles(source.name, fmt, tuple(files), source.text_field, source.streaming)
