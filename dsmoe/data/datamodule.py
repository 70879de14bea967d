"""Continued pre-training data (paper §5.1): a weighted mixture of text sources, tokenised and packed.

Pipeline, one path for hub datasets and local files alike (``datasets`` streaming):

  source --(first ``val_docs_per_source`` docs)--> validation windows, one DataLoader per source
         --(the rest, doc j kept by shard j % num_shards)--> shuffle buffer --> loop forever
  sources --(token-share mixture)--> tokenise, separator after every document --> windows of seq_len+1

* Mixture: ``weight`` is a source's share of *training tokens* (weights are normalised). The next
  document always comes from the source furthest below its share, so the realised shares track the
  weights to within one document; the order of documents inside a source is shuffled with ``seed``.
* Sharding: shard = ``global_rank * num_workers + worker_id``; documents are dealt round-robin, so
  ranks and DataLoader workers see disjoint documents that together cover the source. Every shard
  loops forever (a new shuffle per pass), so no rank runs dry; training stops at ``max_steps``.
* Packing: the token stream is cut into consecutive windows of ``seq_len + 1`` tokens, none dropped
  except the last partial one; ``labels = input_ids`` (HF models shift labels internally), so each
  window trains ``seq_len`` next-token predictions.
* Separator: the tokenizer's EOS, unless it is a chat end-of-turn marker (the SmolLM2 GGUF declares
  ``<|im_end|>``), in which case the vocabulary's document end token (``<|endoftext|>``, id 0) is used.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count, islice
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from dsmoe.data.corpus import DOMAINS, build_corpus

EMBEDDED_PREFIX, PAPER_PREFIX = "embedded:", "paper:"
CHAT_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
DOCUMENT_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
FILE_FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".csv": "csv",
    ".arrow": "arrow",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
READ_BATCH = 256


@dataclass
class SourceConfig:
    """One text source. Either ``path`` (a hub dataset id, or ``embedded:<domain>``) or ``data_files``
    (local jsonl/json/parquet/txt/csv/arrow files or globs; a .txt file is one document)."""

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
        if self.path is not None and self.path.startswith(EMBEDDED_PREFIX):
            domain = self.path.removeprefix(EMBEDDED_PREFIX)
            if domain not in DOMAINS:
                raise ValueError(
                    f"source {self.name!r}: unknown embedded domain {domain!r}; choose from {list(DOMAINS)}"
                )
        if self.data_files is not None:
            files = [self.data_files] if isinstance(self.data_files, str) else list(self.data_files)
            if not files:
                raise ValueError(f"source {self.name!r}: data_files is empty")
            for f in files:
                _file_format(f, self.name)  # fails early on an unknown suffix

    @classmethod
    def from_obj(cls, obj: str | dict | SourceConfig) -> SourceConfig:
        """Build from a shorthand (``embedded:<domain>``, ``paper:<name>``), a dict of fields, or a dict
        with ``preset: <shorthand>`` plus fields that override the preset (e.g. ``weight``)."""
        if isinstance(obj, SourceConfig):
            return obj
        if isinstance(obj, str):
            return _preset(obj)
        if not isinstance(obj, dict):
            raise ValueError(f"a source must be a shorthand string or a mapping, got {obj!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - fields - {"preset"})
        if unknown:
            raise ValueError(f"unknown source key(s) {unknown} in {obj!r}; allowed: {sorted(fields | {'preset'})}")
        overrides = {k: v for k, v in obj.items() if k != "preset"}
        if "preset" in obj:
            return dataclasses.replace(_preset(obj["preset"]), **overrides)
        return cls(**overrides)


# The paper's hub sources (§5.1). The paper does not state mixture weights: equal shares here.
PAPER_SOURCES: dict[str, SourceConfig] = {
    "fineweb-edu": SourceConfig("fineweb-edu", path="HuggingFaceFW/fineweb-edu", config_name="sample-10BT"),
    "open-web-math": SourceConfig("open-web-math", path="open-web-math/open-web-math"),
    "starcoder": SourceConfig("starcoder", path="bigcode/starcoderdata", data_dir="python", text_field="content"),
    "cosmopedia": SourceConfig("cosmopedia", path="HuggingFaceTB/cosmopedia", config_name="web_samples_v2"),
}


def _preset(shorthand: str) -> SourceConfig:
    if shorthand.startswith(EMBEDDED_PREFIX):
        return SourceConfig(name=shorthand.removeprefix(EMBEDDED_PREFIX), path=shorthand)
    if shorthand.startswith(PAPER_PREFIX) and shorthand.removeprefix(PAPER_PREFIX) in PAPER_SOURCES:
        return dataclasses.replace(PAPER_SOURCES[shorthand.removeprefix(PAPER_PREFIX)])
    raise ValueError(
        f"unknown source shorthand {shorthand!r}; use 'embedded:<{'|'.join(DOMAINS)}>' "
        f"or 'paper:<{'|'.join(PAPER_SOURCES)}>'"
    )


@dataclass
class DataConfig:
    """Data settings (paper: seq_len 1024, 5000 validation documents per source)."""

    sources: list[SourceConfig]
    seq_len: int = 1024
    micro_batch_size: int = 8
    val_docs_per_source: int = 5000
    seed: int = 0
    num_workers: int = 0
    shuffle_buffer: int = 1000

    def __post_init__(self) -> None:
        self.sources = [SourceConfig.from_obj(s) for s in self.sources]
        if not self.sources:
            raise ValueError("DataConfig.sources is empty: give at least one source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        for key, low in (("seq_len", 1), ("micro_batch_size", 1), ("val_docs_per_source", 0), ("num_workers", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"DataConfig.{key} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.shuffle_buffer, int) or self.shuffle_buffer < 1:
            raise ValueError(f"DataConfig.shuffle_buffer must be an integer >= 1, got {self.shuffle_buffer!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ValueError(f"unknown data config key(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**values)


# ---------------------------------------------------------------- documents


def _file_format(pattern: str, source_name: str) -> str:
    name = str(pattern).lower()
    for ext in COMPRESSIONS:
        name = name.removesuffix(ext)
    for ext, fmt in FILE_FORMATS.items():
        if name.endswith(ext):
            return fmt
    raise ValueError(
        f"source {source_name!r}: cannot tell the format of {pattern!r}; use one of {sorted(FILE_FORMATS)}"
    )


def load_source(source: SourceConfig):
    """The source as a ``datasets.IterableDataset`` (streaming), whatever its origin."""
    import datasets

    data_files = source.data_files
    if source.path is not None and source.path.startswith(EMBEDDED_PREFIX):
        domain = source.path.removeprefix(EMBEDDED_PREFIX)
        data_files = [str(build_corpus([domain])[domain])]
    if data_files is not None:
        files = [data_files] if isinstance(data_files, str) else [str(f) for f in data_files]
        formats = {_file_format(f, source.name) for f in files}
        if len(formats) > 1:
            raise ValueError(f"source {source.name!r} mixes file formats {sorted(formats)}: split it into sources")
        fmt = formats.pop()
        extra = {"sample_by": "document"} if fmt == "text" else {}
        ds = datasets.load_dataset(fmt, data_files=files, split="train", streaming=source.streaming, **extra)
    else:
        ds = datasets.load_dataset(
            source.path,
            name=source.config_name,
            data_dir=source.data_dir,
            split=source.split,
            streaming=source.streaming,
        )
    return ds if source.streaming else ds.to_iterable_dataset()


def source_texts(source: SourceConfig, dataset=None) -> Iterator[str]:
    """Non-empty documents of ``source`` (read from ``dataset`` if already loaded) in stored order,
    identical on every rank and worker."""
    dataset = load_source(source) if dataset is None else dataset
    # .iter() reads arrow batches and, unlike iter(ds), does not split shards among DataLoader workers:
    # sharding is done here, by document index, so that it is exact for any number of files.
    for batch in dataset.iter(batch_size=READ_BATCH):
        if source.text_field not in batch:
            raise ValueError(
                f"source {source.name!r} has no text field {source.text_field!r}; its columns are {sorted(batch)}"
            )
        for text in batch[source.text_field]:
            if text and text.strip():
                yield text


def validation_texts(source: SourceConfig, n_docs: int) -> list[str]:
    """The held-out documents: the first ``n_docs`` of the source."""
    return list(islice(source_texts(source), n_docs))


def shard_texts(source: SourceConfig, val_docs: int, shard: int, num_shards: int, dataset=None) -> Iterator[str]:
    """One pass over this shard's training documents: training doc j (after the held-out ones) goes to
    shard ``j % num_shards``, so shards are disjoint, cover the source, and never meet validation."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    for j, text in enumerate(islice(source_texts(source, dataset), val_docs, None)):
        if j % num_shards == shard:
            yield text


def _shuffled(items: Iterable[str], buffer_size: int, rng: random.Random) -> Iterator[str]:
    buffer: list[str] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def training_texts(
    source: SourceConfig, val_docs: int, shard: int, num_shards: int, seed: int, shuffle_buffer: int
) -> Iterator[str]:
    """This shard's training documents, shuffled, looping forever with a new shuffle each pass."""
    dataset = load_source(source)
    for epoch in count():
        rng = random.Random(f"{seed}:{source.name}:{shard}:{epoch}")
        empty = True
        for text in _shuffled(shard_texts(source, val_docs, shard, num_shards, dataset), shuffle_buffer, rng):
            empty = False
            yield text
        if empty:
            raise ValueError(
                f"source {source.name!r} has no training documents for shard {shard} of {num_shards}: it needs more "
                f"than val_docs_per_source={val_docs} + {num_shards - 1} documents (lower val_docs_per_source?)"
            )


# ---------------------------------------------------------------- tokens


def document_separator_id(tokenizer) -> int:
    """The token appended after every document: EOS, unless EOS is a chat end-of-turn marker."""
    eos = tokenizer.eos_token
    if eos is not None and eos not in CHAT_END_MARKERS and tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    vocab = tokenizer.get_vocab()
    for token in DOCUMENT_END_TOKENS:
        if token in vocab:
            return vocab[token]
    raise ValueError(
        f"tokenizer has EOS {eos!r} (a chat marker or none) and none of {list(DOCUMENT_END_TOKENS)}: "
        "cannot choose a document separator"
    )


def tokenize_documents(tokenizer, texts: Sequence[str], separator_id: int) -> list[list[int]]:
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [doc + [separator_id] for doc in ids]


def pack(token_lists: Iterable[list[int]], window: int) -> Iterator[list[int]]:
    """Concatenate and cut into consecutive ``window``-token pieces; only the final partial one is dropped."""
    buffer: list[int] = []
    for tokens in token_lists:
        buffer.extend(tokens)
        start = 0
        while len(buffer) - start >= window:
            yield buffer[start : start + window]
            start += window
        del buffer[:start]


def packed_eval_windows(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Held-out texts as a LongTensor [N, seq_len + 1], packed exactly like training (for PPL evaluation)."""
    docs = tokenize_documents(tokenizer, texts, document_separator_id(tokenizer)) if texts else []
    windows = list(pack(docs, seq_len + 1))
    return torch.tensor(windows, dtype=torch.long).reshape(len(windows), seq_len + 1)


def collate(windows: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    input_ids = torch.stack(list(windows))
    return {"input_ids": input_ids, "labels": input_ids.clone()}


class MixtureStream(IterableDataset):
    """Endless packed windows from a token-share mixture of sources, for one rank (split among its workers)."""

    def __init__(self, config: DataConfig, tokenizer, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.config, self.tokenizer, self.rank, self.world_size = config, tokenizer, rank, world_size

    def _documents(self, shard: int, num_shards: int) -> Iterator[list[int]]:
        cfg = self.config
        total = sum(s.weight for s in cfg.sources)
        shares = [s.weight / total for s in cfg.sources]
        streams = [
            training_texts(s, cfg.val_docs_per_source, shard, num_shards, cfg.seed, cfg.shuffle_buffer)
            for s in cfg.sources
        ]
        separator = document_separator_id(self.tokenizer)
        tokens = [0] * len(streams)
        while True:
            seen = sum(tokens)
            i = max(range(len(streams)), key=lambda k: (shares[k] * seen - tokens[k], shares[k]))
            doc = tokenize_documents(self.tokenizer, [next(streams[i])], separator)[0]
            tokens[i] += len(doc)
            yield doc

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        shard, num_shards = self.rank * num_workers + worker_id, self.world_size * num_workers
        for window in pack(self._documents(shard, num_shards), self.config.seq_len + 1):
            yield torch.tensor(window, dtype=torch.long)


class _Windows(Dataset):
    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.windows[index]


class PretrainDataModule(L.LightningDataModule):
    """Training: one endless mixed stream per rank. Validation: one DataLoader per source, in the order
    of ``val_source_names``, over the packed held-out documents."""

    def __init__(self, config: DataConfig, tokenizer) -> None:
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        self.val_source_names = [s.name for s in config.sources]
        self.val_windows: list[torch.Tensor] = []
        self.rank, self.world_size = 0, 1
        self.skip_batches = 0  # set from a checkpoint: training batches this rank already consumed

    def state_dict(self) -> dict[str, int]:
        """Saved in every checkpoint: how many training batches were consumed, so a resumed run continues
        the stream exactly where it stopped (see :func:`skip_first`)."""
        consumed = 0
        if self.trainer is not None:
            consumed = self.trainer.fit_loop.epoch_loop.batch_progress.total.processed
        return {"train_batches_consumed": consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skip_batches = int(state.get("train_batches_consumed", 0))

    def prepare_data(self) -> None:
        """Build the embedded corpus once per node, before any rank reads it."""
        domains = [s.path.removeprefix(EMBEDDED_PREFIX) for s in self.config.sources if _is_embedded(s)]
        if domains:
            build_corpus(domains)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        if self.val_windows:
            return
        cfg = self.config
        for source in cfg.sources:
            head = validation_texts(source, cfg.val_docs_per_source + 1)  # one more: is any left for training?
            if len(head) <= cfg.val_docs_per_source:
                raise ValueError(
                    f"source {source.name!r} has only {len(head)} documents, not more than "
                    f"val_docs_per_source={cfg.val_docs_per_source}: nothing would be left for training"
                )
            held_out = head[: cfg.val_docs_per_source]
            windows = packed_eval_windows(self.tokenizer, held_out, cfg.seq_len)
            if cfg.val_docs_per_source and len(windows) == 0:
                raise ValueError(
                    f"source {source.name!r}: its {cfg.val_docs_per_source} held-out documents fill no window of "
                    f"{cfg.seq_len + 1} tokens; raise val_docs_per_source or lower seq_len"
                )
            self.val_windows.append(windows)

    def train_dataloader(self) -> DataLoader | Iterator[dict[str, torch.Tensor]]:
        cfg = self.config
        loader = DataLoader(
            MixtureStream(cfg, self.tokenizer, self.rank, self.world_size),
            batch_size=cfg.micro_batch_size,
            num_workers=cfg.num_workers,
            collate_fn=collate,
            persistent_workers=cfg.num_workers > 0,
        )
        return skip_first(loader, self.skip_batches) if self.skip_batches else loader

    def val_dataloader(self) -> list[DataLoader]:
        if not self.val_windows:
            self.setup("validate")
        return [
            DataLoader(_Windows(w), batch_size=self.config.micro_batch_size, shuffle=False, collate_fn=collate)
            for w in self.val_windows
        ]


def _is_embedded(source: SourceConfig) -> bool:
    return source.path is not None and source.path.startswith(EMBEDDED_PREFIX)


def skip_first(loader: Iterable, n: int) -> Iterator:
    """The loader's batches after the first n: exact stream resumption for any number of workers.

    The skipped batches are regenerated (read and tokenised, not trained on), so resuming costs time in
    proportion to the tokens already seen.
    """
    iterator = iter(loader)
    for _ in tqdm(range(n), desc="resume: fast-forwarding the training stream", disable=n < 100):
        next(iterator)
    yield from iterator
