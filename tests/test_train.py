"""The one training path: config handling, loss goes down, aux losses reach routers, resume after SIGKILL,
every method trains through the same entry point, export."""

import json
import math
import os
import re
import struct
import subprocess
import sys
import textwrap
import zipfile

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import tiny_model

import dsmoe
from dsmoe.train import (
    check_config,
    check_same_run,
    check_seq_len,
    check_values,
    check_vocabulary,
    export,
    load_config,
    schedule,
    train,
    world_size,
)


def make_cfg(assets, out_dir, **overrides):
    base = {
        "run_name": "run",
        "out_dir": str(out_dir),
        "model": str(assets / "model"),
        "method": "dsmoe",
        "method_options": {"num_experts": 4, "tau": 0.5},
        "calibration_sequences": 4,
        "data": {
            "sources": [
                {"name": "a", "data_files": str(assets / "a.jsonl"), "weight": 0.5},
                {"name": "b", "data_files": str(assets / "b.jsonl"), "weight": 0.5},
            ],
            "seq_len": 32,
            "val_docs_per_source": 8,
            "shuffle_buffer": 16,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
        "trainer": {
            "accelerator": "cpu",
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "max_steps": 6,
            "val_check_interval": 3,
            "limit_val_batches": 2,
            "checkpoint_every_n_steps": 2,
            "log_every_n_steps": 1,
        },
    }
    cfg = OmegaConf.merge(load_config(None), base)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))


class LossRecorder(L.Callback):
    def __init__(self, path=None):
        self.losses, self.path = {}, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[(trainer.global_step, batch_idx % trainer.accumulate_grad_batches)] = outputs["loss"].item()
        if self.path:
            with open(self.path, "a") as f:
                f.write(
                    json.dumps(
                        [trainer.global_step, batch_idx % trainer.accumulate_grad_batches, outputs["loss"].item()]
                    )
                    + "\n"
                )


@pytest.mark.parametrize("devices, expected", [(2, 2), ("2", 2), ("auto", 1), (1, 1)])
def test_world_size_parses_devices_as_lightning_does(devices, expected):
    cfg = load_config(None, ["trainer.accelerator=cpu", "trainer.num_nodes=3"])
    cfg.trainer.devices = devices
    assert world_size(cfg.trainer) == 3 * expected


def test_activation_checkpointing_trains_the_same_weights(tmp_path, assets):
    from dsmoe.models import load_model

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            flags.append(pl_module.model.is_gradient_checkpointing)

    weights, flags = [], []
    for on in (False, True):
        cfg = make_cfg(assets, tmp_path / str(on), **{"trainer.max_steps": 2, "trainer.activation_checkpointing": on})
        model, _ = load_model(str(train(cfg, callbacks=[Probe()])))
        weights.append(model.state_dict())
    assert flags == [False, True]
    for k, v in weights[0].items():
        torch.testing.assert_close(weights[1][k], v, msg=k)


def test_unknown_and_bad_config_values_are_named(tmp_path, assets):
    with pytest.raises(
        ValueError, match=r"\['optim.learning_rate'\] in the command line; allowed in optim: \['betas', 'lr'"
    ):
        load_config(None, ["optim.learning_rate=1"])
    (tmp_path / "typo.yaml").write_text("trainer:\n  devics: 2\n")
    with pytest.raises(ValueError, match=r"\['trainer.devics'\] in .*typo.yaml; allowed in trainer: .*'devices'"):
        load_config(tmp_path / "typo.yaml")
    with pytest.raises(ValueError, match=r"the command line: .*'many'.*trainer.max_steps"):
        load_config(None, ["trainer.max_steps=many"])
    with pytest.raises(ValueError, match=r"the command line: optim.betas=\[0.9\]: .*length 1 does not match .* 2"):
        load_config(None, ["optim.betas=[0.9]"])  # OmegaConf's own message names neither key nor value
    (tmp_path / "betas.yaml").write_text("optim:\n  lr: 0.001\n  betas: [0.9, fast]\n")
    with pytest.raises(ValueError, match=r"betas.yaml: optim.betas=\[0.9, 'fast'\]: .*converted to Float"):
        load_config(tmp_path / "betas.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match=r"list.yaml must be a mapping of \[.*'trainer'\], got \[1\]"):
        load_config(tmp_path / "list.yaml")
    cfg = make_cfg(assets, tmp_path, **{"trainer.global_batch_size": 5})
    with pytest.raises(
        ValueError,
        match=r"global_batch_size=5 is not divisible by micro_batch_size × processes \(devices × num_nodes\) = 2",
    ):
        schedule(cfg)
    cfg = make_cfg(assets, tmp_path, **{"trainer.max_tokens": 12800, "data.seq_len": 100})
    assert schedule(cfg) == (32, 2)  # 12800 tokens / (4 seqs × 100 tokens)
    with pytest.raises(ValueError, match="data.seq_len must be an integer >= 1, got 'abc'"):
        train(make_cfg(assets, tmp_path, **{"data.seq_len": "abc"}))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="unknown method 'moe'"):
        train(make_cfg(assets, tmp_path, method="moe"))


def test_run_name_must_be_a_plain_name_and_export_tokens_a_list(tmp_path, assets):
    for name in ("a/../../x", "../x", "..", "a\\b"):  # the run's folder would be outside out_dir
        with pytest.raises(ValueError, match=re.escape(f"run_name {name!r} is not a plain name (no path separators")):
            check_values(make_cfg(assets, tmp_path, run_name=name))
    check_values(make_cfg(assets, tmp_path, run_name="dsmoe_seed1"))  # the experiment drivers' run names
    cfg = load_config(None, ["run_name=x", "trainer.export_tokens=5"])
    with pytest.raises(ValueError, match=r"trainer.export_tokens must be a list of token counts .*, got 5"):
        check_values(OmegaConf.merge(cfg, {"data": make_cfg(assets, tmp_path).data}))


def test_bad_match_activated_is_named_before_the_model_is_loaded(tmp_path, assets, monkeypatch):
    monkeypatch.setattr("dsmoe.train.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for value, error in [
        ("abc", r"method_options.match_activated must be 'dsmoe' .*, a fraction .*count >= 1000; got 'abc'"),
        (2.0, r"method_options.match_activated=2.0 is below 1000"),
    ]:
        cfg = make_cfg(assets, tmp_path, method="llama_moe", **{"method_options.match_activated": value})
        with pytest.raises(ValueError, match=error):
            train(cfg)


def test_training_lowers_loss_and_sparsity_loss_reaches_routers(tmp_path, assets, capsys, monkeypatch):
    """Also: stdout that is not a terminal (here pytest's capture; a cluster job's log) gets a progress line every
    log_every_n_steps optimizer steps (at most every 30 s) and after each validation, where Rich's bar would print
    only at the end."""
    cfg = make_cfg(
        assets,
        tmp_path,
        **{
            "trainer.max_steps": 12,
            "trainer.val_check_interval": 12,
            "trainer.keep_checkpoints": True,
            "trainer.log_every_n_steps": 5,
        },
    )
    recorder = LossRecorder()
    monkeypatch.setattr("dsmoe.progress.MIN_SECONDS", 0.0)  # (30 s between lines in a real run)
    from dsmoe.lit import LitCausalLM

    taken, log_activation = [], LitCausalLM._log_activation

    def recorded(self, stage, last):  # training's activation statistics: only on the steps the logger writes
        taken.append((stage, self.global_step))
        log_activation(self, stage, last)

    monkeypatch.setattr(LitCausalLM, "_log_activation", recorded)

    class Printer(L.Callback):  # LightningModule.print asks the progress bar whether it is enabled
        def on_train_start(self, trainer, pl_module):
            pl_module.print("[test] printed")

    final = train(cfg, callbacks=[recorder, Printer()])
    out = capsys.readouterr().out
    assert "[test] printed" in out
    lines = [line for line in out.splitlines() if line.startswith("[dsmoe.train] ")]
    steps = [line for line in lines if line.startswith("[dsmoe.train] step ")]
    assert [line.split()[2] for line in steps] == ["5/12", "10/12", "12/12"], lines
    assert all(f"{s * 128:,} tokens, lm_loss " in line for s, line in zip((5, 10, 12), steps, strict=True))
    assert all("mean_active_experts " in line and " left" in line for line in steps)
    (validation,) = [line for line in lines if line.startswith("[dsmoe.train] validation")]
    assert re.fullmatch(r"\[dsmoe.train\] validation at step 12, .*\bppl [\d.]+\b.*", validation), validation
    assert "ppl_a " in validation and "mean_active_experts " in validation and "layer_" not in validation
    losses = list(recorder.losses.values())
    assert sum(losses[-4:]) < 0.95 * sum(losses[:4])  # 0.87-0.92 over seeds after 12 steps
    init, trained = dsmoe.load(tmp_path / "run" / "init_model"), dsmoe.load(final)
    for a, b in zip(dsmoe.dsmoe_layers(init), dsmoe.dsmoe_layers(trained), strict=True):
        assert not torch.equal(a.router.weight, b.router.weight)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events)).Reload()
    tags = set(accumulator.Tags()["scalars"])
    # steps 5, 10 (TensorBoard) and the last, 12 (the last progress line), each of its 2 micro-batches (the second
    # one's values are logged)
    assert [step for stage, step in taken if stage == "train"] == [4, 4, 9, 9, 11, 11]
    written = [
        [event.step for event in accumulator.Scalars(f"train/{name}")] for name in ("lm_loss", "mean_active_experts")
    ]
    assert written[0] == written[1] == [4, 9], written
    expected = {"train/lm_loss", "train/sparsity_loss", "train/loss", "train/mean_active_experts"}
    expected |= {"train/active_experts/layer_01", "train/activated_params_frac", "train/device/items_per_sec"}
    expected |= {"val/ppl", "val/ppl_a", "val/ppl_b", "val/mean_active_experts", "lr-AdamW/pg1"}
    assert expected <= tags, expected - tags
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["global_step"] == 12 and summary["tokens"] == 12 * 4 * 32


def test_sparsity_loss_alone_pushes_gates_down(tmp_path, assets):
    from dsmoe.lit import LitCausalLM, OptimConfig
    from dsmoe.methods import get_method

    model = dsmoe.convert(tiny_model("llama", vocab_size=256), dsmoe.DSMoEConfig(num_experts=4, sparsity_weight=1.0))
    lit = LitCausalLM(model, get_method("dsmoe"), OptimConfig(), dense_params=1)
    ids = torch.randint(0, 256, (2, 16))
    model(input_ids=ids)
    aux = get_method("dsmoe").aux_losses(model)["sparsity"]
    aux.backward()
    for layer in dsmoe.dsmoe_layers(model):
        g = layer.router.weight.grad
        assert g is not None and g.abs().sum() > 0
    assert lit.model.training


def test_resume_after_sigkill_continues_with_the_same_losses(tmp_path, assets):
    """An uninterrupted run and a run killed (SIGKILL) after step 3 then resumed from its step-2 checkpoint
    produce the same per-micro-batch losses."""
    cfg_a = make_cfg(assets, tmp_path / "a")
    rec = LossRecorder()
    train(cfg_a, callbacks=[rec])
    cfg_b = make_cfg(assets, tmp_path / "b")
    OmegaConf.save(cfg_b, tmp_path / "b.yaml")
    log = tmp_path / "b_losses.jsonl"
    child = textwrap.dedent(f"""
        import os, signal, sys, lightning as L
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_train import LossRecorder
        from dsmoe.train import load_config, train

        class Kill(L.Callback):
            def on_train_batch_start(self, trainer, *args):
                if trainer.global_step == 3:
                    os.kill(os.getpid(), signal.SIGKILL)

        train(load_config({str(tmp_path / "b.yaml")!r}), callbacks=[LossRecorder({str(log)!r}), Kill()])
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "b" / "run" / "checkpoints" / "last.ckpt").exists()
    resumed = LossRecorder()
    train(make_cfg(assets, tmp_path / "b", resume="last"), callbacks=[resumed])
    assert min(step for step, _ in resumed.losses) == 2  # continued from the step-2 checkpoint
    for key, loss in resumed.losses.items():
        assert loss == pytest.approx(rec.losses[key], rel=1e-5, abs=1e-6), key
    killed = {tuple(r[:2]): r[2] for r in map(json.loads, log.read_text().splitlines())}
    assert len(killed) >= 4 and all(rec.losses[k] == pytest.approx(v, rel=1e-5) for k, v in killed.items())


@pytest.mark.parametrize(
    "method,options",
    [
        ("dsmoe", {"num_experts": 4, "variant": "no_ste"}),
        ("dsmoe", {"num_experts": 4, "variant": "no_gate"}),
        ("llama_moe", {"num_experts": 4, "top_k": 2}),
        ("sparsegpt", {"match_activated": 0.8}),
        ("llm_pruner_block", {"match_activated": 0.9, "keep_first": 0, "keep_last": 0}),
        ("llm_pruner_channel", {"match_activated": 0.8}),
        ("dense", {}),
    ],
)
def test_every_method_trains_through_the_entry_point_and_exports(tmp_path, assets, method, options):
    """final/ and a kept checkpoint's export hold the same weights, in trainer.export_dtype (bf16 here: fp32 training
    weights are cast for both)."""
    from safetensors import safe_open

    from dsmoe.models import load_model

    overrides = {"trainer.max_steps": 2, "trainer.val_check_interval": 2, "trainer.keep_checkpoints": True}
    cfg = make_cfg(assets, tmp_path, method=method, **overrides, **{"trainer.export_dtype": "bfloat16"})
    cfg.method_options = options
    final = train(cfg)
    model, _ = load_model(str(final))
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        logits = model(ids).logits
    exported = export(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "run", tmp_path / "exported")
    for folder in (final, exported):
        with safe_open(folder / "model.safetensors", "pt") as f:
            floats = {f.get_slice(k).get_dtype() for k in f.keys()} - {"BOOL", "I64", "I32", "U8"}
        assert floats == {"BF16"}, (folder, floats)
    again, _ = load_model(str(exported))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, logits)


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, assets):
    cfg = make_cfg(assets, tmp_path, **{"trainer.devices": 2, "trainer.strategy": "ddp", "trainer.max_steps": 2})
    OmegaConf.save(cfg, tmp_path / "ddp.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "dsmoe.train", "--config", str(tmp_path / "ddp.yaml")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["global_step"] == 2


def test_processes_started_by_torchrun_or_srun_must_agree_with_devices_times_nodes(monkeypatch, tmp_path, assets):
    from dsmoe.train import check_devices

    for variable in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):  # as if started by Lightning
        monkeypatch.delenv(variable, raising=False)
    cfg = make_cfg(assets, tmp_path, **{"trainer.devices": 2, "trainer.num_nodes": 2})
    check_devices(cfg.trainer)  # Lightning starts the processes itself: nothing to compare
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ValueError, match=r"torchrun started 8 processes but trainer.devices=2 × trainer.num_nodes=2"):
        check_devices(cfg.trainer)
    monkeypatch.setenv("WORLD_SIZE", "4")
    check_devices(cfg.trainer)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_JOB_NAME", "table1")
    with pytest.raises(ValueError, match=r"this SLURM job step has \(SLURM_NTASKS\) 16 processes .* gives 4.*srun"):
        check_devices(cfg.trainer)
    # one SLURM task on one node (sbatch --ntasks=1 --gpus=8): Lightning starts the processes itself, as outside SLURM
    from dsmoe.train import lightning_starts_the_processes

    monkeypatch.setenv("SLURM_NTASKS", "1")
    with pytest.raises(ValueError, match=r"\(SLURM_NTASKS\) 1 processes .* gives 4"):  # two nodes: srun must start them
        check_devices(cfg.trainer)
    one_node = make_cfg(assets, tmp_path, **{"trainer.devices": 2}).trainer
    check_devices(one_node)
    assert lightning_starts_the_processes(one_node)
    assert not lightning_starts_the_processes(make_cfg(assets, tmp_path).trainer)  # one device: SLURM's one task
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # not SLURM for Lightning: it starts them anyway
    assert not lightning_starts_the_processes(one_node)


@pytest.mark.slow
def test_ddp_in_a_slurm_job_step_of_one_task(tmp_path, assets):
    """sbatch --ntasks=1 with 2 devices: the run trains on 2 processes that Lightning started (SLURM's variables
    simulated), rank 0 alone preparing the model."""
    cfg = make_cfg(assets, tmp_path, **{"trainer.devices": 2, "trainer.strategy": "ddp", "trainer.max_steps": 2})
    OmegaConf.save(cfg, tmp_path / "ddp.yaml")
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "table1.sbatch", "SLURM_JOB_ID": "7"}
    slurm |= {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    command = [sys.executable, "-m", "dsmoe.train", "--config", str(tmp_path / "ddp.yaml")]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **slurm})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["world_size"] == 2


def test_calibration_runs_on_the_gpu_of_the_runs_first_device(monkeypatch, tmp_path, assets):
    import lightning.fabric.accelerators.cuda as lightning_cuda

    from dsmoe.train import first_gpu

    monkeypatch.setattr(lightning_cuda, "num_cuda_devices", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for devices, expected in (([2, 3], 2), ("1,3", 1), (2, 0), (-1, 0), ("auto", 0)):
        cfg = make_cfg(assets, tmp_path, **{"trainer.devices": devices})
        assert first_gpu(cfg.trainer) == torch.device("cuda", expected), devices


def test_bf16_true_training_keeps_ropes_buffers_fp32(tmp_path, assets):
    """Lightning's bf16-true casts the whole module; RoPE's inv_freq must keep its fp32 values (as under bf16-mixed)."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    expected = LlamaRotaryEmbedding(AutoConfig.from_pretrained(assets / "model")).inv_freq
    seen = {}

    class Look(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rotary = [m for m in pl_module.model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
            seen["inv_freq"] = rotary[0].inv_freq.clone()
            seen["weight"] = pl_module.model.lm_head.weight.dtype

        def on_validation_epoch_end(self, trainer, pl_module):  # before the module's hook, which resets the sums
            metrics = list(pl_module.val_ppl)
            seen["ppl sums"] = {m.total_log_probs.dtype for m in metrics} | {m.count.dtype for m in metrics}
            seen["ppl sums"] |= {m._defaults[k].dtype for m in metrics for k in ("total_log_probs", "count")}

    cfg = make_cfg(assets, tmp_path, **{"trainer.precision": "bf16-true", "trainer.max_steps": 1})
    with pytest.warns(UserWarning, match=r"bf16-true .* optim.lr = 0.003, are lost on weights with \|w\| > 0.77"):
        train(cfg, callbacks=[Look()])
    assert seen["weight"] == torch.bfloat16  # the weights are 16-bit ...
    assert seen["inv_freq"].dtype == torch.float32  # ... RoPE's frequencies are not rounded
    torch.testing.assert_close(seen["inv_freq"], expected, rtol=0, atol=0)
    assert seen["ppl sums"] == {torch.float32}  # nor the validation PPL's sums (bf16 counts tokens exactly to 256)


@pytest.mark.slow
def test_two_nodes_started_by_torchrun_train_what_one_node_with_two_devices_trains(tmp_path, assets):
    """The README's torchrun example: one torchrun per node (here 2 'nodes' of 1 CPU process each, c10d rendezvous),
    trainer.num_nodes: 2; Lightning takes the ranks torchrun gives. Same world size, seed and global batch as
    Lightning's own 2-process DDP: the same trained weights."""
    import socket

    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    nodes = make_cfg(assets, tmp_path / "nodes", **{"trainer.num_nodes": 2, "trainer.strategy": "ddp"})
    nodes.trainer.max_steps = 3
    OmegaConf.save(nodes, tmp_path / "nodes.yaml")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
    rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}"]
    procs = [
        subprocess.Popen(
            [*torchrun, f"--node-rank={n}", *rendezvous, "-m", "dsmoe.train", "--config", str(tmp_path / "nodes.yaml")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0 and "Traceback" not in out, out[-3000:]
    summary = json.loads((tmp_path / "nodes" / "run" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 3

    one = make_cfg(assets, tmp_path / "one", **{"trainer.devices": 2, "trainer.strategy": "ddp"})
    one.trainer.max_steps = 3
    OmegaConf.save(one, tmp_path / "one.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "dsmoe.train", "--config", str(tmp_path / "one.yaml")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_nodes = load_file(tmp_path / "nodes" / "run" / "final" / "model.safetensors")
    by_devices = load_file(tmp_path / "one" / "run" / "final" / "model.safetensors")
    assert by_nodes.keys() == by_devices.keys()
    for k, v in by_devices.items():
        torch.testing.assert_close(by_nodes[k], v, msg=k)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, assets):
    from dsmoe.lit import NonFiniteLossError

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.model.model.embed_tokens.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3.*last finite checkpoint is .*step=2.ckpt"):
        train(make_cfg(assets, tmp_path), callbacks=[Poison()])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_validation_ppl_is_token_weighted_over_sources():
    """val/ppl = exp(Σ NLL / Σ tokens) over every source, against cross-entropy computed here."""
    from torch.nn import functional as F

    from dsmoe.lit import LitCausalLM, OptimConfig
    from dsmoe.methods import get_method

    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=64).eval()
    lit = LitCausalLM(model, get_method("dense"), OptimConfig(), dense_params=1, val_source_names=["a", "b"])
    logged = {}
    lit.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    batches = [(0, torch.randint(0, 64, (2, 9))), (1, torch.randint(0, 64, (1, 5))), (1, torch.randint(0, 64, (3, 7)))]
    nll, tokens = {0: 0.0, 1: 0.0}, {0: 0, 1: 0}
    with torch.no_grad():
        for source, ids in batches:
            lit.validation_step({"input_ids": ids, "labels": ids}, 0, dataloader_idx=source)
            logits = model(input_ids=ids).logits[:, :-1]
            nll[source] += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            tokens[source] += ids[:, 1:].numel()
    lit.on_validation_epoch_end()
    assert logged["val/ppl_a"] == pytest.approx(math.exp(nll[0] / tokens[0]), rel=1e-5)
    assert logged["val/ppl_b"] == pytest.approx(math.exp(nll[1] / tokens[1]), rel=1e-5)
    assert logged["val/ppl"] == pytest.approx(math.exp((nll[0] + nll[1]) / (tokens[0] + tokens[1])), rel=1e-5)


def test_validation_nll_of_a_token_with_an_underflowing_probability_is_finite():
    """Eq. 2 by hand: logits (0, 200, 0), target 0: NLL = log(1 + e^200 + 1) = 200 + log1p(2e^-200); a target at
    IGNORE_INDEX is not counted. torchmetrics' own Perplexity takes log(softmax) = log(0) there: inf."""
    from torchmetrics.text import Perplexity

    from dsmoe.data.datamodule import IGNORE_INDEX
    from dsmoe.lit import TokenPerplexity

    logits = torch.tensor([[[0.0, 200.0, 0.0], [1.0, 2.0, 3.0]]])
    target = torch.tensor([[0, IGNORE_INDEX]])
    ours, theirs = TokenPerplexity(ignore_index=IGNORE_INDEX), Perplexity(ignore_index=IGNORE_INDEX)
    ours.update(logits, target)
    theirs.update(logits, target)
    assert ours.total_log_probs.item() == pytest.approx(200 + math.log1p(2 * math.exp(-200))) and ours.count == 1
    assert theirs.total_log_probs.item() == math.inf


def test_lr_schedule_spans_max_steps(tmp_path, assets):
    """The cosine schedule decays over exactly the run's optimizer steps (max_steps from the Trainer)."""

    class LrRecorder(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx % trainer.accumulate_grad_batches == 0:
                lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    lrs = []
    overrides = {"optim.schedule": "cosine", "optim.warmup_steps": 1, "trainer.max_steps": 5}
    train(make_cfg(assets, tmp_path, **overrides), callbacks=[LrRecorder()])
    base = 3e-3
    expected = [0.0] + [base * 0.5 * (1 + math.cos(math.pi * (s - 1) / 4)) for s in range(1, 5)]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_sigterm_saves_at_the_end_of_the_step_and_resume_continues_with_the_same_losses(tmp_path, assets):
    """SIGTERM in the middle of an optimizer step (gradient accumulation): the step finishes, a checkpoint is saved,
    the process exits with 143 and no traceback; resume=last gives the uninterrupted run's losses."""
    rec = LossRecorder()
    train(make_cfg(assets, tmp_path / "a"), callbacks=[rec])
    OmegaConf.save(make_cfg(assets, tmp_path / "b"), tmp_path / "b.yaml")
    child = textwrap.dedent(f"""
        import os, signal, lightning as L
        from dsmoe.train import load_config, main
        import dsmoe.train

        class Term(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == 2 and batch_idx % 2 == 1:  # second micro-batch of step 3
                    os.kill(os.getpid(), signal.SIGTERM)

        real = dsmoe.train.train
        dsmoe.train.train = lambda cfg: real(cfg, callbacks=[Term()])
        main(["--config", {str(tmp_path / "b.yaml")!r}])
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "stopped by SIGTERM" in proc.stderr, proc.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "b" / "run" / "checkpoints").glob("*step=*.ckpt"))
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt"]
    resumed = LossRecorder()
    train(make_cfg(assets, tmp_path / "b", resume="last"), callbacks=[resumed])
    assert min(step for step, _ in resumed.losses) == 3
    for key, loss in resumed.losses.items():
        assert loss == pytest.approx(rec.losses[key], rel=1e-5, abs=1e-6), key


def test_checkpoints_rotate_exports_hold_the_weights_at_their_token_points(tmp_path, assets):
    overrides = {"trainer.keep_checkpoints": True, "trainer.export_tokens": "[100,256]"}
    train(make_cfg(assets, tmp_path, **overrides))  # 6 steps of 4 × 32 = 128 tokens, a checkpoint every 2
    run = tmp_path / "run"
    names = sorted(p.name for p in (run / "checkpoints").glob("*step=*.ckpt"))
    assert names == ["epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"]  # keep_last_checkpoints=2
    infos = {p.parent.name: json.loads(p.read_text()) for p in (run / "exports").glob("*/export_info.json")}
    assert infos == {
        "tokens_100": {"tokens": 128, "step": 1, "point": 100},
        "tokens_256": {"tokens": 256, "step": 2, "point": 256},
    }
    exported = dsmoe.load(run / "exports" / "tokens_256").state_dict()
    train(make_cfg(assets, tmp_path / "again", **{"trainer.keep_checkpoints": True, "trainer.max_steps": 2}))
    at_step2 = dsmoe.load(tmp_path / "again" / "run" / "final").state_dict()
    for k, v in at_step2.items():
        torch.testing.assert_close(exported[k], v, msg=k)


def test_finished_run_keeps_only_final_exports_and_small_records(tmp_path, assets):
    train(make_cfg(assets, tmp_path, **{"trainer.max_steps": 2}))
    run = tmp_path / "run"
    assert not (run / "checkpoints").exists()
    assert not list((run / "init_model").glob("*.safetensors")) and (run / "init_model" / "dense_params.json").exists()
    with pytest.raises(ValueError, match="holds a finished run"):
        train(make_cfg(assets, tmp_path, **{"trainer.max_steps": 2}))
    assert train(make_cfg(assets, tmp_path, resume="last", **{"trainer.max_steps": 2})) == run / "final"


def test_resume_skips_damaged_or_missing_checkpoints_and_never_restarts_silently(tmp_path, assets, capsys):
    from dsmoe.checkpoints import resume_checkpoint

    train(make_cfg(assets, tmp_path, **{"trainer.keep_checkpoints": True}))
    ckpts = tmp_path / "run" / "checkpoints"
    newest, older = ckpts / "epoch=0-step=6.ckpt", ckpts / "epoch=0-step=4.ckpt"
    with pytest.raises(ValueError, match="already holds checkpoints .*step=6.*resume=last"):
        resume_checkpoint(None, ckpts)
    whole = newest.read_bytes()
    with zipfile.ZipFile(newest) as archive:  # bytes changed inside the largest tensor: a disk fault
        record = max(archive.infolist(), key=lambda info: info.file_size)
        name_len, extra_len = struct.unpack("<HH", whole[record.header_offset + 26 : record.header_offset + 30])
        start = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
    newest.write_bytes(whole[:start] + bytes(b ^ 0xFF for b in whole[start : start + 64]) + whole[start + 64 :])
    assert resume_checkpoint("last", ckpts) == str(older)
    assert "skipping damaged checkpoint(s) epoch=0-step=6.ckpt" in capsys.readouterr().err
    newest.write_bytes(whole[: len(whole) // 2])  # a full disk mid-write
    assert resume_checkpoint("last", ckpts) == str(older)
    assert "skipping damaged checkpoint(s) epoch=0-step=6.ckpt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="incomplete or damaged"):
        resume_checkpoint(str(newest), ckpts)
    newest.unlink()  # last.ckpt now dangles
    assert resume_checkpoint("last", ckpts) == str(older)
    assert "points to a missing checkpoint" in capsys.readouterr().err
    older.write_bytes(b"")
    with pytest.raises(ValueError, match="no intact checkpoint .* all damaged; delete .*checkpoints to train again"):
        resume_checkpoint("last", ckpts)
    torch.serialization.set_crc32_options(False)  # records saved without a CRC (0) are not damaged
    try:
        torch.save({"w": torch.ones(3)}, older)
    finally:
        torch.serialization.set_crc32_options(True)
    assert resume_checkpoint("last", ckpts) == str(older)


def test_a_failed_checkpoint_write_leaves_the_old_file_and_no_partial_one_and_steps_sort_as_numbers(
    tmp_path, monkeypatch
):
    from pathlib import Path

    from lightning.fabric.plugins.io import torch_io

    from dsmoe.checkpoints import AtomicCheckpointIO, is_intact, resume_checkpoint, step_checkpoints

    io = AtomicCheckpointIO()
    saved = tmp_path / "epoch=0-step=9.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, saved)
    before = saved.read_bytes()

    def disk_full(checkpoint, filepath):  # a write that stops part way
        Path(filepath).write_bytes(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch_io, "_atomic_save", disk_full)
    for path in (saved, tmp_path / "epoch=0-step=10.ckpt"):
        with pytest.raises(OSError, match="No space left"):
            io.save_checkpoint({"w": torch.zeros(3)}, path)
    assert os.listdir(tmp_path) == [saved.name] and saved.read_bytes() == before and is_intact(saved)
    monkeypatch.undo()

    with zipfile.ZipFile(tmp_path / "epoch=0-step=11.ckpt", "w") as archive:  # a zip, but no torch.save
        archive.writestr("notes.txt", "not a checkpoint")
    assert not is_intact(tmp_path / "epoch=0-step=11.ckpt")
    (tmp_path / "epoch=0-step=11.ckpt").unlink()
    for step in (10, 100):
        io.save_checkpoint({"w": torch.ones(3)}, tmp_path / f"epoch=0-step={step}.ckpt")
    assert [p.name for p in step_checkpoints(tmp_path)] == [f"epoch=0-step={n}.ckpt" for n in (100, 10, 9)]
    assert resume_checkpoint("last", tmp_path) == str(tmp_path / "epoch=0-step=100.ckpt")


def test_a_sharded_checkpoint_is_renamed_into_place_after_every_rank_wrote_and_replaces_an_older_one(
    tmp_path, monkeypatch
):
    """AtomicFSDPStrategy's protocol, on one process: every rank writes into the temporary directory, a barrier,
    then rank 0 renames it over the target (one already there, e.g. written before a crash, is replaced)."""
    from lightning.pytorch.strategies import FSDPStrategy

    from dsmoe.checkpoints import AtomicFSDPStrategy

    log = []

    def write_shards(self, checkpoint, path, storage_options=None):
        path.mkdir()
        (path / "shard.distcp").write_text(checkpoint["step"])
        log.append(("write", path.name))

    monkeypatch.setattr(FSDPStrategy, "save_checkpoint", write_shards)
    monkeypatch.setattr(AtomicFSDPStrategy, "barrier", lambda self, name=None: log.append(("barrier", name)))
    strategy = AtomicFSDPStrategy(state_dict_type="sharded")
    target = tmp_path / "epoch=0-step=2.ckpt"
    target.mkdir()
    (target / "shard.distcp").write_text("old")
    (target / "stale.distcp").write_text("old")
    strategy.save_checkpoint({"step": "new"}, target)
    assert (
        sorted(p.name for p in target.iterdir()) == ["shard.distcp"] and (target / "shard.distcp").read_text() == "new"
    )
    assert os.listdir(tmp_path) == [target.name]
    write = log.index(("write", f".{target.name}.tmp"))
    assert ("barrier", "dsmoe-checkpoint-written") in log[write + 1 : -1], log  # the rename waits for every rank


def test_rotation_never_deletes_a_checkpoint_outside_the_runs_checkpoint_directory(tmp_path):
    from dsmoe.checkpoints import ResumeCheckpoints

    callback = ResumeCheckpoints(tmp_path / "run" / "checkpoints", every_n_steps=2, keep=2)
    inside, current = (str(tmp_path / "run" / "checkpoints" / f"epoch=0-step={n}.ckpt") for n in (2, 4))
    assert callback._should_remove_checkpoint(None, inside, current)
    assert not callback._should_remove_checkpoint(None, current, current)
    assert not callback._should_remove_checkpoint(None, str(tmp_path / "saved" / "epoch=0-step=2.ckpt"), current)


def test_a_sigterm_that_reached_another_rank_saves_and_stops_this_one_too(tmp_path):
    """The decision to save on SIGTERM is every rank's (a sharded save is a collective): a rank that did not get the
    signal itself saves and stops when another rank did."""
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from dsmoe.checkpoints import ResumeCheckpoints

    callback = ResumeCheckpoints(tmp_path, every_n_steps=100, keep=1)
    saved, asked = [], []

    def any_rank(decision, all=True):
        asked.append((decision, all))
        return True  # another rank got SIGTERM

    trainer = SimpleNamespace(global_step=3, strategy=SimpleNamespace(reduce_boolean_decision=any_rank))
    callback.save_now = lambda trainer: saved.append(trainer.global_step)
    assert not callback.sigterm
    with pytest.raises(SIGTERMException):
        callback.on_train_batch_end(trainer, None, None, None, 0)
    assert saved == [3] and asked == [(False, False)]


def test_a_resumed_run_does_not_export_again_the_token_points_it_had_passed():
    from types import SimpleNamespace

    from dsmoe.train import ExportAtTokens

    exported = []
    callback = ExportAtTokens([600, 100], 128, lambda point, step: exported.append((point, step)))
    callback.on_train_start(SimpleNamespace(global_step=3), None)  # resumed at step 3: 384 tokens seen
    for step in (3, 4, 4, 5):  # the batch ends of steps 4 and 5 (two micro batches for step 4)
        callback.on_train_batch_end(SimpleNamespace(global_step=step), None, None, None, 0)
    assert exported == [(600, 5)]  # not (100, 4): tokens_100 holds the weights of step 1


def test_a_data_mistake_found_after_preparation_is_corrected_without_preparing_again(tmp_path, assets):
    """More held-out documents than a source has is found by the data module, after init_model/ is written; the
    corrected data is taken (the prepared model does not depend on it), unless the method calibrates on the data."""
    from dsmoe.train import prepared_settings, run_settings

    with pytest.raises(ValueError, match="val_docs_per_source"):
        train(make_cfg(assets, tmp_path, **{"data.val_docs_per_source": 1000}))
    prepared = tmp_path / "run" / "init_model" / "dense_params.json"
    stamp = prepared.stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"holds a run with other settings — method_options.tau: 0.5 \(run\) vs"):
        train(make_cfg(assets, tmp_path, **{"method_options.tau": 0.25}, resume="last"))  # the prepared model's own
    export = tmp_path / "run" / "exports" / "tokens_1"
    export.mkdir(parents=True)  # trained with the settings it was started with (Tables 5/6 read it): all compared
    with pytest.raises(ValueError, match=r"holds a run with other settings — data: "):
        train(make_cfg(assets, tmp_path, resume="last"))
    export.rmdir()
    assert train(make_cfg(assets, tmp_path, **{"trainer.max_steps": 1}, resume="last")) == tmp_path / "run" / "final"
    assert prepared.stat().st_mtime_ns == stamp  # not prepared again
    calibrating = make_cfg(assets, tmp_path, method="sparsegpt")
    calibrating.method_options = {"sparsity": 0.5}
    assert "data" in prepared_settings(run_settings(calibrating))  # SparseGPT's Hessians come from the data
    assert "data" not in prepared_settings(run_settings(make_cfg(assets, tmp_path)))


def test_bad_config_fails_before_anything_is_written_and_a_changed_config_is_refused(tmp_path, assets):
    with pytest.raises(ValueError, match="optim.lr must be a positive number, got -0.001"):
        train(make_cfg(assets, tmp_path, **{"optim.lr": -1e-3}))
    assert not (tmp_path / "run" / "init_model").exists()
    with pytest.raises(ValueError, match="trainer.micro_batch_size must be a positive integer, got 0"):
        train(make_cfg(assets, tmp_path, **{"trainer.micro_batch_size": 0}))
    missing = make_cfg(assets, tmp_path)
    missing.data.sources[1].data_files = str(tmp_path / "gone.jsonl")
    with pytest.raises(Exception, match=r"gone.jsonl") as error:
        train(missing)
    assert "'b'" in str(error.value)  # names the source too
    assert not (tmp_path / "run" / "init_model").exists()
    train(make_cfg(assets, tmp_path, **{"trainer.max_steps": 1, "trainer.checkpoint_every_n_steps": 1}))
    (tmp_path / "run" / "train_summary.json").unlink()  # as if it had stopped before finishing
    changed = make_cfg(assets, tmp_path, resume="last", **{"method_options.num_experts": 2})
    with pytest.raises(
        ValueError, match=r"holds a run with other settings — method_options.num_experts: 4 \(run\) vs 2"
    ):
        train(changed)
    longer = make_cfg(assets, tmp_path, resume="last", **{"trainer.max_steps": 3, "optim.lr": 1e-3})
    with pytest.raises(
        ValueError, match=r"optim.lr: 0.003 \(run\) vs 0.001 \(now\).*trainer.max_steps: 1 \(run\) vs 3"
    ):
        train(longer)  # a run resumed by calling dsmoe.train directly is held to what decides its result
    # where it runs and how often it checkpoints may change between a run and its resumption
    moved = make_cfg(assets, tmp_path, resume="last", **{"trainer.max_steps": 1, "trainer.checkpoint_every_n_steps": 5})
    check_same_run(tmp_path / "run", moved)


def test_a_failed_preparation_does_not_tie_the_run_directory_to_its_configuration(tmp_path, assets, monkeypatch):
    import dsmoe.train as dt

    def out_of_memory(cfg, init_dir):
        raise RuntimeError("out of memory (simulated)")

    real = dt.prepare_model
    monkeypatch.setattr(dt, "prepare_model", out_of_memory)
    with pytest.raises(RuntimeError, match="simulated"):
        train(make_cfg(assets, tmp_path, **{"trainer.max_steps": 1}))
    assert (tmp_path / "run" / "config.yaml").exists()
    monkeypatch.setattr(dt, "prepare_model", real)
    fixed = make_cfg(assets, tmp_path, **{"trainer.max_steps": 1, "method_options.num_experts": 2})
    assert train(fixed).name == "final"  # nothing was prepared: the changed configuration is no other run's


def test_a_run_directory_written_before_a_key_existed_compares_it_at_its_default(tmp_path, assets):
    cfg = make_cfg(assets, tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "final").mkdir()  # it holds a result
    old = OmegaConf.to_container(cfg)
    del old["calibration_sequences"], old["trainer"]["gradient_clip_val"]  # as an older version wrote it ...
    old["trainer"]["retired_flag"] = True  # ... with a key since removed
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    check_same_run(run_dir, make_cfg(assets, tmp_path, calibration_sequences=32))  # the defaults: the same run
    old["calibration_batches"] = 3  # the key's old name and unit: micro-batches (of 2 sequences here) ...
    old["method"] = "sparsegpt"  # ... for a method that calibrates
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    check_same_run(run_dir, make_cfg(assets, tmp_path, method="sparsegpt", calibration_sequences=6))
    with pytest.raises(ValueError, match=r"calibration_sequences: 6 \(run\) vs 4 \(now\)"):
        check_same_run(run_dir, make_cfg(assets, tmp_path, method="sparsegpt"))
    old["method"] = "dsmoe"  # DSMoE never reads calibration data: its count is not compared
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    check_same_run(run_dir, make_cfg(assets, tmp_path))
    del old["calibration_batches"]
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    with pytest.raises(ValueError, match=r"trainer.gradient_clip_val: 1.0 \(run\) vs 0.5 \(now\)"):
        check_same_run(
            run_dir, make_cfg(assets, tmp_path, calibration_sequences=32, **{"trainer.gradient_clip_val": 0.5})
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"trainer.devices": 0}, r"trainer.devices=0 \(accelerator 'cpu'\): .*should be an int > 0"),
        ({"trainer.num_nodes": 0}, "trainer.num_nodes must be a positive integer, got 0"),
        ({"trainer.accelerator": "tpu"}, r"trainer.accelerator 'tpu' is unknown; choose one of \['auto', 'cpu'"),
        ({"trainer.precision": "16-true"}, r"trainer.precision '16-true' cannot train with AdamW: .* use 16-mixed"),
        ({"trainer.limit_val_batches": 1.5}, r"trainer.limit_val_batches must be .* in \(0, 1\], got 1.5"),
        ({"calibration_sequences": 0}, "calibration_sequences must be a positive integer, got 0"),  # hung before
        ({"optim.weight_decay": -1}, "optim.weight_decay must be >= 0"),
        ({"method": "llama_moe"}, r"unknown option\(s\) \['tau'\] for method 'llama_moe'; allowed: .*'top_k'"),
        (
            {"optim.warmup_steps": 2},  # make_cfg's schedule is constant
            r"optim.warmup_steps=2 would be ignored: optim.schedule='constant' has no warmup; use constant_with_warmup",
        ),
        (
            {"optim.warmup_steps": 6, "optim.schedule": "cosine"},
            "optim.warmup_steps=6 is not below the run's 6 optimizer steps",
        ),
        (
            {"data.seq_len": 300},  # the tiny model's max_position_embeddings is 256
            r"data.seq_len=300 exceeds the model's max_position_embeddings=256: .* 301 tokens; .* <= 255",
        ),
        ({"data.seq_len": 256}, r"data.seq_len=256 exceeds the model's max_position_embeddings=256"),
        (  # a seq_len too long also makes the run too short for its warmup: the cause is named, not the symptom
            {"data.seq_len": 10**5, "trainer.max_tokens": 4096, "optim.warmup_steps": 2, "optim.schedule": "cosine"},
            r"data.seq_len=100000 exceeds the model's max_position_embeddings=256",
        ),
        ({"method_options.num_experts": 3}, r"intermediate size D=128 is not divisible by num_experts=3"),
        ({"method_options.tau": 2}, r"tau must lie in \[0, 1\)"),
        ({"method_options.tau": "abc"}, r"tau must lie in \[0, 1\) since gates are sigmoids, got 'abc'"),
        ({"method_options.sparsity_weight": "abc"}, "sparsity_weight must be a number >= 0, got 'abc'"),
        ({"method_options.router_init_std": "abc"}, r"router_init_std must be a number > 0 or None .*, got 'abc'"),
        ({"method_options.match_activated": 0.6}, "method 'dsmoe' takes no method_options.match_activated"),
        ({"method": "dense"}, r"method 'dense' takes no options, got \['num_experts', 'tau'\]"),
    ],
)
def test_bad_trainer_and_method_options_are_named_before_the_model_is_prepared(tmp_path, assets, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(make_cfg(assets, tmp_path, **overrides))
    assert not (tmp_path / "run").exists()


def test_a_model_the_method_cannot_cut_or_whose_tokenizer_outgrows_it_is_named_before_anything_is_written(
    tmp_path, assets
):
    """An MoE already (only its shared expert would be cut), a model without a SwiGLU FFN's intermediate_size, and a
    tokenizer with more tokens than the embedding (an IndexError deep in the first forward) are named from the
    config, before the run directory is made."""
    from transformers import AutoTokenizer, GPT2Config, LlamaConfig, Qwen2MoeConfig

    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    cases = {
        "moe": (
            Qwen2MoeConfig(num_experts=4),
            r"\(qwen2_moe\) is a mixture of experts already \(config.num_experts=4\)",
        ),
        "gpt2": (GPT2Config(), r"\(gpt2\) has no intermediate_size in its config: not a Llama-family model"),
        "small": (
            LlamaConfig(vocab_size=100, intermediate_size=128),
            rf"its tokenizer gives ids up to {tokenizer.vocab_size - 1} but config.vocab_size=100: .*resize_token_emb",
        ),
    }
    for name, (config, message) in cases.items():
        config.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        with pytest.raises(ValueError, match=message):
            train(make_cfg(assets, tmp_path / "out", model=str(tmp_path / name)))
        assert not (tmp_path / "out").exists()
    for method, options in (("llama_moe", {"num_experts": 4, "top_k": 2}), ("dsmoe", {})):  # n by default too
        other = make_cfg(assets, tmp_path / "out", model=str(tmp_path / "moe"), method=method)
        other.method_options = options
        with pytest.raises(ValueError, match=r"\(qwen2_moe\) is a mixture of experts already"):
            check_config(other)
    # a special token added beyond the embedding but never produced from text (a pad token) is no fault
    padded = AutoTokenizer.from_pretrained(assets / "model")
    padded.add_special_tokens({"pad_token": "<newpad>"})
    LlamaConfig(vocab_size=tokenizer.vocab_size, intermediate_size=128).save_pretrained(tmp_path / "pad")
    padded.save_pretrained(tmp_path / "pad")
    assert len(padded) > tokenizer.vocab_size
    check_vocabulary(str(tmp_path / "pad"))


def test_seq_len_is_checked_against_the_models_positions_where_its_config_is_read_offline(assets):
    check_seq_len(255, str(assets / "model"))  # windows of 256 tokens: the tiny model's max_position_embeddings
    check_seq_len(4095, "meta-llama/Llama-2-7b-hf")  # the shipped config: no download
    with pytest.raises(ValueError, match="data.seq_len=4096 exceeds the model's max_position_embeddings=4096"):
        check_seq_len(4096, "meta-llama/Llama-2-7b-hf")
    check_seq_len(10**6, "dsmoe-tests/not-in-the-cache")  # no config offline: not checked


def test_a_whole_method_options_override_replaces_the_yamls_and_bad_yaml_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("method: dsmoe\nmethod_options: {num_experts: 4, tau: 0.5}\n")
    cfg = load_config(
        tmp_path / "c.yaml", ["method=llama_moe", "method_options={top_k: 2}", "method_options.num_experts=4"]
    )
    assert cfg.method_options == {"top_k": 2, "num_experts": 4}
    assert load_config(tmp_path / "c.yaml", ["method_options.tau=0.7"]).method_options == {"num_experts": 4, "tau": 0.7}
    (tmp_path / "bad.yaml").write_text("trainer: {a: [\n")
    with pytest.raises(ValueError, match=r"bad.yaml is not valid YAML: while parsing"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="the command line is not valid YAML"):
        load_config(None, ["trainer.export_tokens=[100,"])


def test_an_override_through_a_list_sets_that_items_field(tmp_path):
    """``data.sources.0.weight=0.5`` sets one source's weight (a merge of the dot-list cannot reach into a list: it
    raised OmegaConf's TypeError); a shorthand item, a missing index and a bare word are named."""
    (tmp_path / "s.yaml").write_text(
        "data:\n  sources:\n    - {name: a, preset: 'embedded:web'}\n    - embedded:math\n"
    )
    cfg = load_config(tmp_path / "s.yaml", ["data.sources.0.weight=0.5", "trainer.max_steps=3"])
    assert cfg.data.sources[0] == {"name": "a", "preset": "embedded:web", "weight": 0.5} and cfg.trainer.max_steps == 3
    assert cfg.data.sources[1] == "embedded:math"
    assert load_config(tmp_path / "s.yaml", ["data.sources.1=embedded:code"]).data.sources[1] == "embedded:code"
    replaced = load_config(tmp_path / "s.yaml", ["data.sources=[{name: b}]", "data.sources.0.weight=2"])
    assert OmegaConf.to_container(replaced.data.sources) == [{"name": "b", "weight": 2}]
    with pytest.raises(ValueError, match=r"data.sources.1 is 'embedded:math' \(data.sources has 2 item\(s\).*"):
        load_config(tmp_path / "s.yaml", ["data.sources.1.weight=0.5"])
    with pytest.raises(ValueError, match=r"there is no data.sources.5 \(data.sources has 2 item"):
        load_config(tmp_path / "s.yaml", ["data.sources.5.weight=0.5"])
    with pytest.raises(ValueError, match=r"data.sources.x.weight=0.5: Index 'x'.*numbered from 0"):
        load_config(tmp_path / "s.yaml", ["data.sources.x.weight=0.5"])
    bracket = load_config(tmp_path / "s.yaml", ["data.sources[0].weight=${optim.lr}", " trainer.max_steps=4"])
    assert bracket.data.sources[0].weight == bracket.optim.lr and bracket.trainer.max_steps == 4  # as the merge does
    with pytest.raises(ValueError, match=r"optim.betas.0=0.8: optim.betas is a tuple, set whole: optim.betas=\[...\]"):
        load_config(tmp_path / "s.yaml", ["optim.betas[0]=0.8"])
    with pytest.raises(ValueError, match=r"'badsyntax' is not an override of the form key=value"):
        load_config(None, ["badsyntax"])


def test_weights_that_turn_non_finite_are_never_checkpointed(tmp_path, assets):
    from dsmoe.checkpoints import NonFiniteError

    class PoisonAfterStep(L.Callback):  # runs before the checkpoint callback of the same step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                with torch.no_grad():
                    pl_module.model.lm_head.weight.fill_(float("inf"))

    with pytest.raises(NonFiniteError, match=r"not finite at step 4.*last finite checkpoint is .*step=2"):
        train(make_cfg(assets, tmp_path), callbacks=[PoisonAfterStep()])
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*step=*.ckpt"))
    assert names == ["epoch=0-step=2.ckpt"]


def test_calibration_takes_the_same_sequences_at_any_micro_batch_size(assets):
    """SparseGPT/LLM-Pruner calibrate on ``calibration_sequences`` training sequences; the micro-batch size (2 on a
    7B node, 4 on a 1B one) only decides how they are batched."""
    from transformers import AutoTokenizer

    from dsmoe.data import DataConfig, PretrainDataModule
    from dsmoe.train import calibration_batches

    data = OmegaConf.to_container(make_cfg(assets, "unused").data)
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    taken = {}
    for micro in (2, 3, 5):
        module = PretrainDataModule(DataConfig.from_dict({**data, "micro_batch_size": micro, "seed": 0}), tokenizer)
        batches = calibration_batches(module, 7)
        assert [len(b) for b in batches] == [micro] * (7 // micro) + ([7 % micro] if 7 % micro else [])
        taken[micro] = torch.cat(batches)
    assert torch.equal(taken[2], taken[3]) and torch.equal(taken[2], taken[5])


def test_ddp_does_not_broadcast_buffers_before_every_forward(assets, tmp_path):
    """Buffers (RoPE, SparseGPT's masks) are equal on every rank and fixed: no broadcast of them on each forward."""
    from lightning.pytorch.strategies import DDPStrategy

    from dsmoe.train import build_strategy

    model = tiny_model("llama")
    for strategy, devices in (("ddp", 2), ("auto", 2), ("ddp", 1)):
        cfg = make_cfg(assets, tmp_path, **{"trainer.strategy": strategy, "trainer.devices": devices})
        built = build_strategy(cfg, model)
        assert isinstance(built, DDPStrategy) and built._ddp_kwargs == {"broadcast_buffers": False}
    assert build_strategy(make_cfg(assets, tmp_path, **{"trainer.devices": 1}), model) == "auto"


def test_training_and_evaluation_forwards_build_no_kv_cache():
    """Llama's config has use_cache=True; under FSDP's activation checkpointing transformers does not turn it off,
    and each forward (and its recompute) would keep every layer's keys and values (~1 GB per micro-batch at 7B)."""
    from dsmoe.evaluate import perplexity
    from dsmoe.lit import LitCausalLM, OptimConfig
    from dsmoe.methods import get_method

    model = tiny_model("llama", vocab_size=64)
    assert model.config.use_cache
    ids = torch.randint(0, 64, (2, 9))
    lit = LitCausalLM(model, get_method("dense"), OptimConfig(), dense_params=1)
    assert lit(ids, labels=ids).past_key_values is None
    assert model(input_ids=ids).past_key_values is not None  # what the default would keep
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("use_cache")), with_kwargs=True)
    perplexity(model.eval(), [ids[0], ids[1, :5]])
    assert seen and set(seen) == {False}


def test_training_hardware_names_the_runs_device_and_strategy():
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from dsmoe.checkpoints import AtomicFSDPStrategy
    from dsmoe.results import cpu_model, training_hardware
    from dsmoe.train import strategy_name

    names = [strategy_name(s) for s in (DDPStrategy(), AtomicFSDPStrategy(), SingleDeviceStrategy("cpu"))]
    assert names == ["ddp", "fsdp", "single_device"]
    cpu = torch.device("cpu")
    assert training_hardware(2, 8, cpu, "fsdp") == f"2 nodes x 8 CPU {cpu_model()}, fsdp"
    assert training_hardware(1, 1, cpu, "single_device") == f"1 CPU {cpu_model()}, single_device"


RANK_ZERO_FAILS = textwrap.dedent("""
    import os, sys, time
    import lightning as L
    import dsmoe.train

    config, pids = sys.argv[1], sys.argv[2]

    class FailOnRankZero(L.Callback):  # rank 0 alone fails mid-run; the other rank waits
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with open(f"{pids}.rank{trainer.global_rank}", "w") as f:
                f.write(str(os.getpid()))
            if trainer.global_step == 1 and trainer.global_rank == 0:
                raise RuntimeError("rank 0 fails here")
            if trainer.global_step == 1:  # as in an NCCL collective, which does not notice a dead peer (gloo does)
                time.sleep(300)

    real = dsmoe.train.train
    dsmoe.train.train = lambda cfg: real(cfg, callbacks=[FailOnRankZero()])
    dsmoe.train.main(["--config", config])
""")


def test_a_failing_rank_zero_stops_the_ranks_lightning_started(tmp_path, assets):
    """Lightning kills every rank when one it started fails, but not when rank 0 (the process it was started as)
    fails: the others would wait in a collective until the timeout (30 min), holding their GPUs after the driver
    has reported the failure."""
    import time

    cfg = make_cfg(assets, tmp_path, **{"trainer.devices": 2, "trainer.strategy": "ddp", "trainer.max_steps": 3})
    OmegaConf.save(cfg, tmp_path / "ddp.yaml")
    (tmp_path / "child.py").write_text(RANK_ZERO_FAILS)
    command = [sys.executable, str(tmp_path / "child.py"), str(tmp_path / "ddp.yaml"), str(tmp_path / "pid")]
    with open(tmp_path / "log", "w") as log:  # not a pipe, which rank 1 would hold open
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=300).returncode
    output = (tmp_path / "log").read_text()
    assert code != 0 and "rank 0 fails here" in output, output[-3000:]
    other = int((tmp_path / "pid.rank1").read_text())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(other, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.kill(other, 9)
    raise AssertionError(f"rank 1 (pid {other}) outlived the failed run")


def test_sparsegpts_pruned_weights_have_no_gradient_when_clipping(tmp_path, assets, monkeypatch):
    """The pruned weights are not parameters of the pruned model: their gradients are zeroed before the global
    norm is clipped (counted, they would shrink the kept weights' updates whenever clipping engages)."""
    from dsmoe.baselines import sparsegpt as sg
    from dsmoe.lit import LitCausalLM

    seen = []
    clip = LitCausalLM.configure_gradient_clipping

    def looking(self, optimizer, *args, **kwargs):
        pairs = self.model.__dict__[sg.TRAINING_MASKS]
        seen.append(max(float(w.grad[pruned].abs().max()) for w, pruned in pairs if pruned.any()))
        seen.append(max(float(w.grad[~pruned].abs().max()) for w, pruned in pairs))
        return clip(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(LitCausalLM, "configure_gradient_clipping", looking)
    cfg = make_cfg(assets, tmp_path, method="sparsegpt", **{"trainer.max_steps": 2})
    cfg.method_options = {"sparsity": 0.5}
    train(cfg)
    assert len(seen) == 4 and seen[0] == seen[2] == 0 and seen[1] > 0 and seen[3] > 0  # pruned: none; kept: some


def test_weight_decay_groups_read_through_the_wrappers_names():
    """Norm weights and 1-D parameters get no weight decay, also where FSDP / activation checkpointing have wrapped
    the layers (their names then hold `_checkpoint_wrapped_module.` / `_fsdp_wrapped_module.`)."""
    from types import SimpleNamespace

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from dsmoe.lit import LitCausalLM, OptimConfig
    from dsmoe.methods import get_method

    model = tiny_model("llama")
    lit = LitCausalLM(model, get_method("dense"), OptimConfig(weight_decay=0.1), dense_params=1)
    apply_activation_checkpointing(model, check_fn=lambda m: type(m).__name__ == "LlamaDecoderLayer")
    assert any("_checkpoint_wrapped_module." in name for name, _ in model.named_parameters())
    lit.trainer = SimpleNamespace(estimated_stepping_batches=10)
    groups = lit.configure_optimizers()["optimizer"].param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.1
    assert no_decay == {name for name, p in model.named_parameters() if "norm" in name or p.ndim < 2}
    assert any("_checkpoint_wrapped_module." in name for name in no_decay)
