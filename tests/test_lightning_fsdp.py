"""The real FSDP training path (Lightning's FSDP strategy through ``python -m dsmoe.train``) with 2 CPU processes
(gloo): sharded checkpoints, SIGTERM and resume, the gathered export, SparseGPT's masks under bf16-mixed. Lightning
refuses FSDP without a GPU; dsmoe's strategy wraps on the CPU itself, so the same code runs here as on a GPU node."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf
from test_train import make_cfg

import dsmoe
from dsmoe.baselines.sparsegpt import load_sparsegpt, pruned_params
from dsmoe.train import export

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import lightning as L
    import dsmoe.train

    config, losses, stop_at = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Record(L.Callback):  # each rank's per-micro-batch losses; SIGTERM to rank 0 in the middle of a step
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0 and batch_idx == 0:  # RoPE's frequencies as the first forward sees them
                rope = [m for m in pl_module.model.modules() if type(m).__name__.endswith("RotaryEmbedding")][0]
                with open(f"{losses}.rope{trainer.global_rank}", "w") as f:
                    json.dump([str(rope.inv_freq.dtype), rope.inv_freq.tolist()], f)
            if trainer.global_step == stop_at and batch_idx % trainer.accumulate_grad_batches == 1:
                if trainer.global_rank == 0:
                    os.kill(os.getpid(), signal.SIGTERM)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            key = [trainer.global_step, batch_idx % trainer.accumulate_grad_batches, outputs["loss"].item()]
            with open(f"{losses}.rank{trainer.global_rank}", "a") as f:
                f.write(json.dumps(key) + "\\n")

    real = dsmoe.train.train
    dsmoe.train.train = lambda cfg: real(cfg, callbacks=[Record()])
    dsmoe.train.main(["--config", config])
""")


def run_fsdp(tmp_path, cfg, name, stop_at=-1):
    (tmp_path / "child.py").write_text(CHILD)
    OmegaConf.save(cfg, tmp_path / f"{name}.yaml")
    command = [sys.executable, str(tmp_path / "child.py"), str(tmp_path / f"{name}.yaml"), str(tmp_path / name)]
    return subprocess.run([*command, str(stop_at)], capture_output=True, text=True, timeout=600)


def losses(tmp_path, name, rank):
    lines = (tmp_path / f"{name}.rank{rank}").read_text().splitlines()
    return {tuple(json.loads(line)[:2]): json.loads(line)[2] for line in lines}


@pytest.fixture
def fsdp_cfg(assets):
    def cfg(out_dir, **overrides):
        fsdp = {"trainer.devices": 2, "trainer.strategy": "fsdp", "trainer.precision": "32-true"}
        return make_cfg(assets, out_dir, **{**fsdp, **overrides})

    return cfg


def test_fsdp_sigterm_saves_sharded_and_resume_equals_the_uninterrupted_run(tmp_path, fsdp_cfg):
    """Run b, with activation checkpointing, is stopped by SIGTERM in the middle of step 4 and resumed: its losses on
    both ranks and its final weights are run a's (no checkpointing, never stopped)."""
    steps = {"trainer.max_steps": 5, "trainer.global_batch_size": 8, "trainer.val_check_interval": 5}
    keep = {"trainer.keep_checkpoints": True, "trainer.checkpoint_every_n_steps": 5}  # a sharded one at the end
    whole = run_fsdp(tmp_path, fsdp_cfg(tmp_path / "a", **steps, **keep), "a")
    assert whole.returncode == 0, whole.stderr[-3000:]
    steps["trainer.activation_checkpointing"] = True  # the 7B setting; the same losses
    stopped = run_fsdp(tmp_path, fsdp_cfg(tmp_path / "b", **steps), "b", stop_at=3)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "stopped by SIGTERM" in stopped.stderr, stopped.stderr[-3000:]
    assert (tmp_path / "b" / "run" / "preempted").read_text() == "step 4\n"  # for a driver behind torchrun
    last = tmp_path / "b" / "run" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and sorted(p.name for p in last.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "meta.pt",
    ]
    resumed = run_fsdp(tmp_path, fsdp_cfg(tmp_path / "b", resume="last", **steps), "b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        assert losses(tmp_path, "b", rank) == pytest.approx(losses(tmp_path, "a", rank), rel=1e-6)  # resumed too
    a, b = (dsmoe.load(tmp_path / x / "run" / "final").state_dict() for x in "ab")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)
    assert json.loads((tmp_path / "a" / "run" / "train_summary.json").read_text())["world_size"] == 2
    # the sharded checkpoint of the last step, exported in one process, is the final model the ranks gathered
    exported = export(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt", tmp_path / "a" / "run", tmp_path / "x")
    x = dsmoe.load(exported).state_dict()
    assert x.keys() == a.keys()
    for k in a:
        torch.testing.assert_close(x[k], a[k], rtol=0, atol=0, msg=k)


def test_fsdp_bf16_true_keeps_ropes_frequencies_fp32(tmp_path, fsdp_cfg, assets):
    """Under bf16-true Lightning's FSDP policy would cast buffers to bf16 at the first forward; dsmoe's keeps them."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    steps = {"trainer.precision": "bf16-true", "trainer.max_steps": 1, "trainer.val_check_interval": 1}
    proc = run_fsdp(tmp_path, fsdp_cfg(tmp_path, **steps), "t")
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = LlamaRotaryEmbedding(AutoConfig.from_pretrained(assets / "model")).inv_freq.tolist()
    for rank in (0, 1):
        assert json.loads((tmp_path / f"t.rope{rank}").read_text()) == ["torch.float32", expected]


def test_fsdp_bf16_mixed_keeps_sparsegpt_pruned_weights_zero(tmp_path, fsdp_cfg):
    cfg = fsdp_cfg(
        tmp_path,
        method="sparsegpt",
        **{"trainer.precision": "bf16-mixed", "trainer.max_steps": 3, "trainer.val_check_interval": 3},
    )
    cfg.method_options = {"sparsity": 0.5, "blocksize": 16}
    proc = run_fsdp(tmp_path, cfg, "s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = losses(tmp_path, "s", 0)
    assert len(first) == 3 and all(v == v for v in first.values())
    model = load_sparsegpt(tmp_path / "run" / "final")  # raises if trained weights lost their zeros
    assert pruned_params(model) >= model.config.sparsegpt["pruned"] > 0


def test_fsdp_tied_embeddings_train_and_export_from_shards(tmp_path, fsdp_cfg, assets):
    """Llama-3.2-1B and SmolLM2 tie lm_head to the embedding. Under FSDP the tie survives training, the gathered final
    save and the one-process export of the sharded checkpoint (which stores the shared tensor under one name)."""
    from tiny_models import tiny_model
    from transformers import AutoTokenizer

    tiny_model("llama", tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    AutoTokenizer.from_pretrained(assets / "model").save_pretrained(tmp_path / "tied")
    steps = {"trainer.max_steps": 2, "trainer.val_check_interval": 2, "trainer.checkpoint_every_n_steps": 2}
    cfg = fsdp_cfg(tmp_path / "a", model=str(tmp_path / "tied"), **steps, **{"trainer.keep_checkpoints": True})
    proc = run_fsdp(tmp_path, cfg, "a")
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = dsmoe.load(tmp_path / "a" / "run" / "final")
    exported = dsmoe.load(
        export(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt", tmp_path / "a" / "run", tmp_path / "x")
    )
    for model in (final, exported):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    before = tiny_model("llama", tie_word_embeddings=True).model.embed_tokens.weight
    assert not torch.equal(final.model.embed_tokens.weight, before)  # trained
    a, x = final.state_dict(), exported.state_dict()
    assert a.keys() == x.keys()
    for k in a:
        torch.testing.assert_close(x[k], a[k], rtol=0, atol=0, msg=k)
