"""The training stream's positional state: exact continuation after a resume (workers, ranks), bounded reading
on resume, per-rank states gathered under torch.distributed, refusals, batched tokenisation."""

import json
import os
import sys
from itertools import islice
from types import SimpleNamespace

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp

from dsmoe.data import DataConfig, PretrainDataModule, SourceConfig, WindowStream, prepare_sources
from dsmoe.data.tokens import tokenize_documents

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import word_tokenizer  # noqa: E402

ROWS, FILES = 40, 6
pytestmark = pytest.mark.filterwarnings(r"ignore:source 'j' has 1 file\(s\) for:UserWarning")  # tested in test_data


def write_sources(root, write=True):
    """Two sources: 6 parquet files (length-varying documents) and one jsonl; words name the document."""
    words = []
    for f in range(FILES):
        texts = [" ".join([f"p{f}r{r}"] * (1 + (r * 7) % 11)) for r in range(ROWS)]
        if write:
            pq.write_table(pa.table({"text": texts, "id": list(range(ROWS))}), root / f"part-{f}.parquet")
        words += [f"p{f}r{r}" for r in range(ROWS)]
    if write:
        (root / "j.jsonl").write_text("".join(json.dumps({"text": f"j{k} " * (2 + k % 5)}) + "\n" for k in range(90)))
    words += [f"j{k}" for k in range(90)]
    sources = [
        SourceConfig("p", data_files=str(root / "part-*.parquet"), weight=2.0),
        SourceConfig("j", data_files=str(root / "j.jsonl")),
    ]
    return sources, word_tokenizer(words)


def data_module(cfg, tok, rank, world_size=2):
    dm = PretrainDataModule(cfg, tok)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, training=True)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("num_workers", [0, 2, 3])  # 3: physical worker p continues logical p + next
def test_resume_continues_the_batches_exactly(tmp_path, num_workers):
    """Per rank: train 7 batches (one more prefetched by the loader), checkpoint the DataModule, resume in a new
    one: the next batches equal those of the uninterrupted loader."""
    sources, tok = write_sources(tmp_path)
    cfg = DataConfig(sources=sources, seq_len=11, micro_batch_size=3, val_docs_per_source=4, shuffle_buffer=5)
    cfg.num_workers = num_workers
    for rank in range(2):
        dm = data_module(cfg, tok, rank)
        batches = [dm.on_before_batch_transfer(b, 0) for b in islice(dm.train_dataloader(), 14)]
        interrupted = data_module(cfg, tok, rank)  # trains on 7 batches while its loader prefetches more
        for batch in islice(interrupted.train_dataloader(), 7):
            interrupted.on_before_batch_transfer(batch, 0)
        state = interrupted.state_dict()
        assert set(state["ranks"]) == {rank} and state["world_size"] == 2

        resumed = data_module(cfg, tok, rank)
        resumed.load_state_dict(torch.load(_saved(tmp_path, state), weights_only=True))  # as Lightning stores it
        after = [resumed.on_before_batch_transfer(b, 0) for b in islice(resumed.train_dataloader(), 7)]
        for k, batch in enumerate(after):
            assert torch.equal(batch["input_ids"], batches[7 + k]["input_ids"]), (rank, k)
        assert resumed.state_dict()["ranks"] == dm.state_dict()["ranks"], "the resumed run's state diverged"
        other = data_module(cfg, tok, 1 - rank)
        assert not torch.equal(next(iter(other.train_dataloader()))["input_ids"], batches[0]["input_ids"])


def _saved(tmp_path, state):
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_resume_at_a_late_position_reads_a_bounded_number_of_documents(tmp_path, monkeypatch):
    """Resuming in the last file of the second epoch reads that file (and the next, for read-ahead) and tokenises
    one read-ahead batch, not the documents before the position."""
    from dsmoe.data import stream as stream_module

    tokenised = []
    real = stream_module.tokenize_documents
    monkeypatch.setattr(stream_module, "TOKENIZE_BATCH", 4)
    monkeypatch.setattr(
        stream_module, "tokenize_documents", lambda t, texts, s: tokenised.extend(texts) or real(t, texts, s)
    )
    sources, tok = write_sources(tmp_path)
    cfg = DataConfig(sources=sources[:1], seq_len=7, val_docs_per_source=4, shuffle_buffer=6)
    prepared, _ = prepare_sources(cfg)
    stream = WindowStream(prepared, tok, cfg, reader=0, num_readers=1)
    windows = iter(stream)
    for _, late in windows:
        epoch, cursor, row, _, _ = late["positions"][0]
        if (epoch, cursor) == (1, FILES - 1) and row > ROWS // 2:
            break
    assert stream.rows_read >= (2 * FILES - 1) * ROWS and len(tokenised) > FILES * ROWS  # what a replay would cost
    following = [w for w, _ in islice(windows, 30)]

    tokenised.clear()
    resumed = WindowStream(prepared, tok, cfg, reader=0, num_readers=1, state=late)
    continued = iter(resumed)
    first, _ = next(continued)
    assert resumed.rows_read <= 2 * ROWS, resumed.rows_read
    assert len(tokenised) <= 2 * 4, len(tokenised)
    assert [first] + [w for w, _ in islice(continued, 29)] == following


def test_state_after_every_window_resumes_exactly(tmp_path):
    """Across block, file and epoch boundaries, with carried documents: for many cut points the continuation equals
    the uninterrupted stream (a reader of 3 that reads whole files, and one that deals rows of a shared file)."""
    sources, tok = write_sources(tmp_path)
    cfg = DataConfig(sources=sources, seq_len=9, val_docs_per_source=4, shuffle_buffer=7, seed=5)
    prepared, _ = prepare_sources(cfg)
    for reader in (0, 2):
        out = list(islice(WindowStream(prepared, tok, cfg, reader, 3), 400))
        carried = 0
        for k in range(0, 390, 13):
            carried += out[k][1]["carry"] is not None
            resumed = WindowStream(prepared, tok, cfg, reader, 3, state=out[k][1])
            assert [w for w, _ in islice(resumed, 10)] == [w for w, _ in out[k + 1 : k + 11]], (reader, k)
        assert carried > 5 and out[-1][1]["positions"][1][0] >= 2, "cuts must include carries and later epochs"


def test_a_state_at_the_end_of_a_block_resumes(tmp_path, monkeypatch):
    """Windows of exactly one document and blocks that divide the tokenizer batch: after a whole tokenizer batch the
    queue is empty and the reader stands at its block's end (offset = block size), which a resume must accept."""
    from dsmoe.data import stream as stream_module

    monkeypatch.setattr(stream_module, "TOKENIZE_BATCH", 8)
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": f"w{k} w{k}"}) + "\n" for k in range(40)))
    tok = word_tokenizer([f"w{k}" for k in range(40)])
    cfg = DataConfig(
        sources=[SourceConfig("s", data_files=str(tmp_path / "s.jsonl"))],
        seq_len=2,
        val_docs_per_source=0,
        shuffle_buffer=4,
    )
    prepared, _ = prepare_sources(cfg)
    out = list(islice(WindowStream(prepared, tok, cfg, 0, 1), 30))
    _, state = out[7]  # after 8 windows = 8 documents = 2 whole blocks
    assert state["carry"] is None and state["positions"][0][3:] == [1, 4], state
    resumed = WindowStream(prepared, tok, cfg, 0, 1, state=state)
    assert [w for w, _ in islice(resumed, 10)] == [w for w, _ in out[8:18]]


def _gather_worker(rank, path, cfg, tok):
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}.store", rank=rank, world_size=2)
    try:
        dm = data_module(cfg, tok, rank)
        for batch in islice(dm.train_dataloader(), 2 + rank):
            dm.on_before_batch_transfer(batch, 0)
        state = dm.state_dict()
        torch.save(
            {"state": state, "local": {"workers": dm._workers, "next_worker": dm._next_worker}}, f"{path}.{rank}"
        )
    finally:
        torch.distributed.destroy_process_group()


def test_state_dict_gathers_every_rank_under_torch_distributed(tmp_path):
    sources, tok = write_sources(tmp_path)
    cfg = DataConfig(sources=sources, seq_len=11, micro_batch_size=2, val_docs_per_source=4, shuffle_buffer=5)
    path = str(tmp_path / "gather")
    mp.start_processes(_gather_worker, args=(path, cfg, tok), nprocs=2, join=True, start_method="fork")
    saved = [torch.load(f"{path}.{r}", weights_only=True) for r in range(2)]
    assert saved[0]["state"] == saved[1]["state"], "every rank must return the same gathered state"
    ranks = saved[0]["state"]["ranks"]
    assert ranks == {r: saved[r]["local"] for r in range(2)} and ranks[0] != ranks[1]
    resumed = data_module(cfg, tok, rank=1)
    resumed.load_state_dict(saved[0]["state"])
    resumed.train_dataloader()
    assert resumed._workers == saved[1]["local"]["workers"]


def test_resume_with_another_layout_or_config_is_refused(tmp_path):
    sources, tok = write_sources(tmp_path)
    cfg = DataConfig(sources=sources, seq_len=11, micro_batch_size=2, val_docs_per_source=4, num_workers=2)
    dm = data_module(cfg, tok, rank=0)
    dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    state = dm.state_dict()
    single = data_module(cfg, tok, rank=0, world_size=1)
    single.load_state_dict(state)
    with pytest.raises(ValueError, match=r"read by 2 rank\(s\) x 2 DataLoader worker\(s\); this run has 1 x 2"):
        single.train_dataloader()
    fewer = data_module(DataConfig(**{**cfg.__dict__, "num_workers": 1}), tok, rank=0)
    fewer.load_state_dict(state)
    with pytest.raises(ValueError, match=r"read by 2 rank\(s\) x 2 DataLoader worker\(s\); this run has 2 x 1"):
        fewer.train_dataloader()
    other = data_module(DataConfig(**{**cfg.__dict__, "seq_len": 12}), tok, rank=0)
    with pytest.raises(ValueError, match=r"different data settings \['seq_len'\] \(checkpoint: \{'seq_len': 11\}"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"written by an older data stream \(format 1, this one reads 3"):
        other.load_state_dict({"train_batches_consumed": 12})
    with pytest.raises(ValueError, match=r"older data stream \(format 2, .*its positions count other documents"):
        other.load_state_dict({**state, "format": 2})  # before repeats of held-out texts were skipped
    assert state["files"]["p"] == [str(tmp_path / f"part-{f}.parquet") for f in range(FILES)]


def test_resume_after_the_files_behind_a_glob_changed_is_refused(tmp_path):
    """data_files "part-*.parquet" is the same setting after a file was added: the positions (file index, row) would
    point into other documents, and the held-out sample could be redrawn from trained-on files."""
    sources, tok = write_sources(tmp_path)
    cfg = DataConfig(sources=sources, seq_len=11, micro_batch_size=2, val_docs_per_source=4)
    dm = data_module(cfg, tok, rank=0)
    dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    state = dm.state_dict()
    (tmp_path / "part-0a.parquet").write_bytes((tmp_path / "part-0.parquet").read_bytes())  # sorts among them
    resumed = data_module(cfg, tok, rank=0)
    resumed.load_state_dict(state)  # the settings are the same ...
    with pytest.raises(ValueError, match=r"source 'p' reads other files .* \(6 then, 7 now; added 1: .*part-0a"):
        resumed.train_dataloader()  # ... the files are not
    (tmp_path / "part-0a.parquet").unlink()
    again = data_module(cfg, tok, rank=0)
    again.load_state_dict(state)
    again.train_dataloader()  # the same files: resumes


def test_batched_tokenisation_equals_one_document_per_call():
    from dsmoe.data import build_corpus
    from dsmoe.models import load_tokenizer

    tok = load_tokenizer()
    texts = [json.loads(line)["text"] for line in islice(open(build_corpus(["math"])["math"]), 40)]
    texts += ["", " leading space", "trailing\n\n"]
    batched = tokenize_documents(tok, texts, 0)
    assert batched == [tokenize_documents(tok, [t], 0)[0] for t in texts]


class _RecordBatches(L.LightningModule):
    """Trains one parameter and records every batch it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        assert set(batch) == {"input_ids", "labels"}
        self.seen.append(batch["input_ids"].clone())
        return (self.weight - batch["input_ids"].float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(cfg, tok, root, max_steps, ckpt_path=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = _RecordBatches()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        accumulate_grad_batches=3,
        callbacks=[ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=PretrainDataModule(cfg, tok), ckpt_path=ckpt_path)
    return module.seen


def test_lightning_resume_with_workers_trains_the_same_batches(tmp_path):
    """Through Lightning's own loop (prefetching, 2 workers, 3 batches per step, checkpoint at step 3 of 6, so the
    next batch is worker 1's): the resumed run trains exactly the batches the uninterrupted run trained after it."""
    sources, tok = write_sources(tmp_path)
    cfg = DataConfig(sources=sources, seq_len=11, micro_batch_size=2, val_docs_per_source=4, num_workers=2)
    full = _fit(cfg, tok, tmp_path / "full", max_steps=6)
    assert len(full) == 18
    (checkpoint,) = (tmp_path / "full").glob("*step=3.ckpt")
    resumed = _fit(cfg, tok, tmp_path / "resumed", max_steps=6, ckpt_path=checkpoint)
    assert len(resumed) == 9
    for k, batch in enumerate(resumed):
        assert torch.equal(batch, full[9 + k]), k


DDP_SCRIPT = """
import sys, torch, lightning as L
sys.path.insert(0, {tests!r})
from test_stream import _RecordBatches, write_sources
from dsmoe.data import DataConfig, PretrainDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from pathlib import Path

root, out, ckpt = Path({root!r}), sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
sources, tok = write_sources(root, write=False)  # the test wrote them: ranks only read
cfg = DataConfig(sources=sources, seq_len=11, micro_batch_size=2, val_docs_per_source=4, num_workers=2)
module = _RecordBatches()
trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_steps=6, accumulate_grad_batches=3, logger=False,
    callbacks=[ModelCheckpoint(dirpath=root / out, every_n_train_steps=3, save_top_k=-1)],
    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
)
trainer.fit(module, datamodule=PretrainDataModule(cfg, tok), ckpt_path=ckpt)
torch.save(module.seen, root / f"{{out}}-rank{{trainer.global_rank}}.pt")
"""


@pytest.mark.slow
def test_ddp_resume_restores_each_rank_its_own_stream(tmp_path):
    """2 DDP ranks (gloo) x 2 workers through Lightning: the checkpoint holds both ranks' states (gathered when it
    is dumped), and after a resume each rank trains exactly the batches it trained in the uninterrupted run."""
    import subprocess

    write_sources(tmp_path)
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__), root=str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(script), "full"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    (checkpoint,) = (tmp_path / "full").glob("*step=3.ckpt")
    state = torch.load(checkpoint, weights_only=True)["PretrainDataModule"]
    assert set(state["ranks"]) == {0, 1} and state["ranks"][0] != state["ranks"][1]
    run = subprocess.run(
        [sys.executable, str(script), "resumed", str(checkpoint)], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in range(2):
        full = torch.load(tmp_path / f"full-rank{rank}.pt")
        resumed = torch.load(tmp_path / f"resumed-rank{rank}.pt")
        assert len(full) == 18 and len(resumed) == 9
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[9:], strict=True)), rank
    assert not torch.equal(torch.load(tmp_path / "full-rank0.pt")[0], torch.load(tmp_path / "full-rank1.pt")[0])
