"""Data files: their formats, reading one file as Arrow batches through ``datasets`` streaming, its text values,
and the check of one local file before any model work starts (sources resolve to files in ``dsmoe.data.sources``).

Every error about a file names the file and its source (``DataFileError``, a ``ValueError``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

FILE_FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".csv": "csv",
    ".arrow": "arrow",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")

READ_BATCH = 1024  # rows per Arrow batch
CHECK_BYTES = 1 << 20  # bytes of a text-like file decoded by check_local_file


def file_format(pattern: str, source_name: str) -> str:
    """The ``datasets`` packaged builder that reads ``pattern`` (json, parquet, text, csv, arrow)."""
    name = str(pattern).lower()
    for ext in COMPRESSIONS:
        name = name.removesuffix(ext)
    for ext, fmt in FILE_FORMATS.items():
        if name.endswith(ext):
            return fmt
    if os.path.isdir(os.path.expanduser(str(pattern))):
        raise ValueError(
            f"source {source_name!r}: data_files {pattern!r} is a folder: give it as path, or its files as a glob "
            f"(e.g. '{str(pattern).rstrip('/')}/*.jsonl')"
        )
    raise ValueError(
        f"source {source_name!r}: cannot tell the format of {pattern!r}; use one of {sorted(FILE_FORMATS)}"
    )


class DataFileError(ValueError):
    """A data file is missing, unreadable or malformed, or holds no usable text; the message names it."""


@dataclass(frozen=True)
class SourceFiles:
    """A source resolved to its data files, in stored order (file index = position in ``files``)."""

    name: str
    format: str
    files: tuple[str, ...]
    text_field: str
    streaming: bool = True

    def describe(self, index: int) -> str:
        return f"source {self.name!r}, file {self.files[index]!r}"


_BUILDER_CLASSES: dict[str, type] = {}


def _open_file(files: SourceFiles, index: int):
    """File ``index`` as a ``datasets.IterableDataset``, through the packaged builder of its format.

    The builder class is looked up once per format and process (``load_dataset`` per file would resolve
    patterns and send a download-count request to the hub for every file opened)."""
    import datasets

    name = files.files[index]
    extra = {"sample_by": "document"} if files.format == "text" else {}
    if files.format not in _BUILDER_CLASSES:
        _BUILDER_CLASSES[files.format] = type(datasets.load_dataset_builder(files.format, data_files=[name], **extra))
    builder = _BUILDER_CLASSES[files.format](data_files={"train": [name]}, **extra)
    if files.streaming:
        return builder.as_streaming_dataset(split="train")
    builder.download_and_prepare()
    return builder.as_dataset(split="train").to_iterable_dataset()


def read_batches(files: SourceFiles, index: int) -> Iterator[pa.Table]:
    """File ``index`` of the source as Arrow tables of up to READ_BATCH rows, in stored order.

    Reading goes through the ``datasets`` packaged builder of the format (streaming), so local files and
    hub files are read the same way. Any failure is re-raised as a DataFileError naming the file."""
    try:
        yield from _open_file(files, index).with_format("arrow").iter(batch_size=READ_BATCH)
    except DataFileError:
        raise
    except StopIteration as err:  # the json builder's schema inference on a file without rows
        raise DataFileError(f"{files.describe(index)}: the file is empty (no rows)") from err
    except Exception as err:  # noqa: BLE001 - decoding errors of every kind: name the file, keep the cause
        raise DataFileError(
            f"{files.describe(index)}: cannot read it as {files.format}: {type(err).__name__}: {err}"
        ) from err


def _json_extension_example(column: pa.ChunkedArray) -> object:
    """The first non-string value of a column that ``datasets`` keeps as JSON because its types are mixed."""
    for value in column.to_pylist():
        decoded = json.loads(value) if isinstance(value, str) else value
        if decoded is not None and not isinstance(decoded, str):
            return decoded
    return None


def text_values(table: pa.Table, files: SourceFiles, index: int, rows: list[int] | None = None) -> list[str | None]:
    """The text field of a batch as Python strings (None where missing), only ``rows`` if given.

    Errors name the file: no such field, non-string values (with the value's type), text that is not UTF-8."""
    if files.text_field not in table.column_names:
        raise DataFileError(
            f"{files.describe(index)} has no text field {files.text_field!r}; its columns are {sorted(table.column_names)}"
        )
    column = table.column(files.text_field)
    kind = column.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        if getattr(kind, "extension_name", None) == "arrow.json":
            example = _json_extension_example(column)
            what = "JSON values of mixed types"
        else:
            example = next((v for v in column.to_pylist() if v is not None), None)
            what = f"{kind} values"
        raise DataFileError(
            f"{files.describe(index)}: text field {files.text_field!r} holds {what}, not strings "
            f"(e.g. {example!r} of type {type(example).__name__}); point text_field at the text column"
        )
    if rows is not None:
        column = column.take(pa.array(rows, type=pa.int64()))
    try:
        return column.to_pylist()
    except UnicodeDecodeError as err:
        raise DataFileError(
            f"{files.describe(index)}: the text is not valid UTF-8 ({err}); re-encode it as UTF-8"
        ) from err


def check_local_file(files: SourceFiles, index: int) -> None:
    """File ``index`` exists, is a non-empty regular file and readable (parquet: its footer and the text field;
    uncompressed json/text/csv: UTF-8; jsonl: a first record with the text field)."""
    path = Path(files.files[index])
    where = files.describe(index)
    if not path.exists():
        raise DataFileError(f"{where}: no such file")
    if not path.is_file():
        raise DataFileError(f"{where}: not a regular file")
    if path.stat().st_size == 0:
        raise DataFileError(f"{where}: the file is empty")
    try:
        with open(path, "rb") as f:
            head = f.read(CHECK_BYTES)
    except OSError as err:
        raise DataFileError(f"{where}: cannot open it: {err}") from err
    compressed = path.name.lower().endswith(COMPRESSIONS)
    if files.format == "parquet":
        import pyarrow.parquet as pq

        try:
            metadata = pq.read_metadata(path)
            schema = metadata.schema.to_arrow_schema()
        except Exception as err:  # noqa: BLE001
            raise DataFileError(f"{where}: not a readable parquet file: {type(err).__name__}: {err}") from err
        if metadata.num_rows == 0:
            raise DataFileError(f"{where}: the file is empty (no rows)")
        if files.text_field not in schema.names:
            raise DataFileError(
                f"{where} has no text field {files.text_field!r}; its columns are {sorted(schema.names)}"
            )
    elif files.format in ("json", "text", "csv") and not compressed:
        if len(head) == CHECK_BYTES:  # a multi-byte character may be cut at the end of the sample
            head = head[: head.rfind(b"\n") + 1] or head[:-4]
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataFileError(
                f"{where}: not UTF-8 text (byte {err.start} is {head[err.start : err.start + 1]!r}); "
                "re-encode it as UTF-8"
            ) from err
        if files.format == "json" and path.suffix.lower() == ".jsonl":
            first = next((line for line in text.splitlines() if line.strip()), None)
            try:
                record = json.loads(first) if first is not None else None
            except json.JSONDecodeError as err:
                raise DataFileError(f"{where}: line 1 is not JSON: {err}") from err
            if not isinstance(record, dict):
                raise DataFileError(f"{where}: line 1 is not a JSON object, got {type(record).__name__}")
            if files.text_field not in record:
                raise DataFileError(
                    f"{where}: line 1 has no text field {files.text_field!r}; its keys are {sorted(record)}"
                )
