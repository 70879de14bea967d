"""FSDP logic of the suite on CPU: torch FSDP with 2 gloo processes (Lightning refuses FSDP without a GPU, so the
functions are tested on plain torch FSDP, the way the Trainer wraps the model: decoder layers as units,
use_orig_params=True). Each process checks its results against the same training done unsharded in one process."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsmoe.distributed import launch_id, launch_rank, run_once, wait_for

WORLD = 2


def _wrap(model, policy=None):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return FSDP(
        model,
        auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
        use_orig_params=True,
        mixed_precision=policy,
        device_id=torch.device("cpu"),
    )


def _batches(rank):
    torch.manual_seed(123)
    full = [torch.randint(0, 256, (2 * WORLD, 16)) for _ in range(3)]
    return full, [b[2 * rank : 2 * rank + 2] for b in full]


def _train(model, batches, clip, step_hook=None, root=None):
    """SGD steps (momentum, weight decay: it touches pruned weights too) with clipping through
    dsmoe.distributed.clip_grad_norm; returns the norms before clipping. Not Adam: it turns gradients that differ in
    the last bit around 0 into full-size updates, so sharded and unsharded runs could not be compared."""
    from dsmoe.distributed import clip_grad_norm

    root = root or model
    opt = torch.optim.SGD(root.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    norms = []
    for ids in batches:
        opt.zero_grad()
        root(input_ids=ids, labels=ids).loss.backward()
        norms.append(float(clip_grad_norm(root, clip)))
        opt.step()
        if step_hook is not None:
            step_hook()
    return norms


def _worker(rank, init_file):
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from tiny_models import tiny_model

    from dsmoe import convert
    from dsmoe.baselines.sparsegpt import MASK, SparseGPTConfig, enforce_masks, sparsegpt_prune, take_training_masks
    from dsmoe.config import DSMoEConfig
    from dsmoe.distributed import all_finite, full_state_dict, mixed_precision_policy
    from dsmoe.stats import activation_stats, count_params, param_counts

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    full, local = _batches(rank)

    # clipping and the gathered export: equal to one process training on the whole batch
    ref = tiny_model("llama", seed=0)
    ref_norms = _train(ref, full, clip=0.05)
    sharded = _wrap(tiny_model("llama", seed=0))
    norms = _train(sharded, local, clip=0.05)
    assert norms == pytest.approx(ref_norms, rel=1e-4), (norms, ref_norms)
    assert max(ref_norms) > 0.05  # the clip was active
    state = full_state_dict(sharded)
    if rank == 0:
        expected = ref.state_dict()
        assert set(state) == set(expected)
        for k, v in expected.items():
            torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5, msg=k)
    else:
        assert state == {}
    assert all_finite(sharded)

    # a tied model (SmolLM2, Llama-3.2-1B): the gathered export gives both names the trained matrix, and loading it
    # keeps the tie and the one-process model's logits
    ref = tiny_model("llama", seed=3, tie_word_embeddings=True)
    _train(ref, full, clip=0.05)
    sharded = _wrap(tiny_model("llama", seed=3, tie_word_embeddings=True))
    _train(sharded, local, clip=0.05)
    state = full_state_dict(sharded)
    if rank == 0:
        torch.testing.assert_close(state["lm_head.weight"], state["model.embed_tokens.weight"], rtol=0, atol=0)
        torch.testing.assert_close(state["lm_head.weight"], ref.lm_head.weight, rtol=1e-4, atol=1e-5)
        exported = tiny_model("llama", seed=4, tie_word_embeddings=True)
        exported.load_state_dict(state)
        assert exported.lm_head.weight is exported.model.embed_tokens.weight
        with torch.no_grad():
            torch.testing.assert_close(exported(full[0]).logits, ref(full[0]).logits, rtol=1e-4, atol=1e-4)

    # the mixed-precision policy keeps RoPE's buffer in fp32 and reduces gradients in fp32
    policy = mixed_precision_policy("bf16-mixed")
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == policy.buffer_dtype == torch.float32
    lightning_default = FSDPPrecision("bf16-mixed").mixed_precision_config
    assert lightning_default.buffer_dtype == torch.bfloat16  # what the policy is for
    bf16 = _wrap(tiny_model("llama", seed=0), policy)
    bf16(input_ids=local[0])
    assert bf16.module.model.rotary_emb.inv_freq.dtype == torch.float32

    # SparseGPT masks on 1-D shards: pruned weights stay exactly 0, kept ones train as unsharded
    def pruned_model():
        model = tiny_model("llama", seed=1)
        return sparsegpt_prune(model, [full[0]], SparseGPTConfig(sparsity=0.5, blocksize=32))

    ref = pruned_model()
    masks = {name: getattr(m, MASK).clone() for name, m in ref.named_modules() if hasattr(m, MASK)}
    take_training_masks(ref)
    _train(ref, full, clip=1.0, step_hook=lambda: enforce_masks(ref))
    model = pruned_model()
    wrapped = _wrap(model)
    shards = [m for m in model.modules() if hasattr(m, MASK)]
    weights_before = [m.weight for m in shards]
    take_training_masks(model)  # as LitCausalLM.on_train_start does, after wrapping
    assert not any(hasattr(m, MASK) for m in model.modules())  # no whole-matrix masks kept beside the shards
    _train(wrapped, local, clip=1.0, step_hook=lambda: enforce_masks(model))
    assert all(a is b for a, b in zip(weights_before, [m.weight for m in shards], strict=True))
    state = full_state_dict(wrapped)
    if rank == 0:
        for name, mask in masks.items():
            w = state[f"{name}.weight"]
            assert (w[mask] == 0).all(), name
            assert (w[~mask] != 0).float().mean() > 0.99, name
            torch.testing.assert_close(w, ref.get_submodule(name).weight, rtol=1e-4, atol=1e-5, msg=name)

    # global parameter counts: taken before wrapping, not from the shards
    dsmoe_model = convert(tiny_model("llama", seed=2), DSMoEConfig(num_experts=4)).eval()
    counts = param_counts(dsmoe_model)
    dsmoe_wrapped = _wrap(dsmoe_model)
    assert count_params(dsmoe_wrapped) != counts.total  # the bug: local shards
    with torch.no_grad():
        dsmoe_wrapped(input_ids=local[0])
    stats = activation_stats(dsmoe_model, params=counts)
    assert stats.total_params == counts.total == count_params(convert(tiny_model("llama", seed=2), DSMoEConfig(4)))
    dist.destroy_process_group()


def test_fsdp_clip_export_masks_counts_and_buffers_match_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)


def test_launch_rank_reads_the_launchers_variables(monkeypatch):
    for var in ("RANK", "SLURM_PROCID", "SLURM_NTASKS", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert launch_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank Lightning's launcher started on the second node of two GPUs
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launch_rank() == 3
    for var in ("LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert launch_rank() == 0  # a single-task allocation
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert launch_rank() == 3
    monkeypatch.setenv("RANK", "5")
    assert launch_rank() == 5


def test_collectives_run_in_every_process_group_of_several_ranks(monkeypatch):
    import dsmoe.distributed as distributed

    calls = []
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, op: calls.append("all_reduce") or t.add_(1))
    for world_size in (1, 2, 3):
        monkeypatch.setattr(distributed, "world", lambda n=world_size: (0, n))
        calls.clear()
        distributed.barrier()
        assert distributed.all_reduce_sum(torch.zeros(1)).item() == (world_size > 1)
        assert calls == (["barrier", "all_reduce"] if world_size > 1 else []), world_size
    calls.clear()  # another rank's weights are not finite: no rank saves
    assert not distributed.all_finite(torch.nn.Linear(2, 2)) and calls == ["all_reduce"]


def test_run_once_rank0_works_others_wait_and_see_failures(tmp_path, monkeypatch):
    done, failed = tmp_path / "done", tmp_path / "failed"
    for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "this-launch")
    monkeypatch.setenv("RANK", "0")

    def fail():
        raise ValueError("no such model")

    with pytest.raises(ValueError):
        run_once(done, failed, "prepare", fail)
    assert failed.read_text() == "launch: torchrun:this-launch#0\nValueError: no such model\n"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr("dsmoe.distributed.time.sleep", lambda s: pytest.fail("this launch's failure: no waiting"))
    with pytest.raises(RuntimeError, match="rank 0 failed to prepare: ValueError: no such model"):
        run_once(done, failed, "prepare", lambda: pytest.fail("only rank 0 works"))
    monkeypatch.setenv("RANK", "0")
    run_once(done, failed, "prepare", lambda: done.write_text("ok"))
    assert done.exists() and os.path.exists(failed) is False
    run_once(done, failed, "prepare", lambda: pytest.fail("done already: a resumed run does not prepare again"))


def test_launch_ids_differ_between_launches(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_NTASKS", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert launch_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert launch_id() is None  # the batch script itself, not an srun step: nothing tells its launches apart
    ids = set()
    for run_id in ("uuid-1", "uuid-2"):  # two torchrun --standalone launches in one batch script
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
        for restart in ("0", "1"):
            monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
            ids.add(launch_id())
    assert len(ids) == 4
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default --rdzv-id under srun: the step decides
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    for restart in ("0", "1"):  # torchrun restarts, then a requeue of the job
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
        ids.add(launch_id())
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    ids.add(launch_id())
    assert len(ids) == 7 and None not in ids


def test_waiting_ranks_ignore_an_earlier_launchs_failure(tmp_path, monkeypatch):
    """Under torchrun/srun every rank starts at once: a peer may look before rank 0 has removed the failure of the
    previous attempt. It must wait for this launch's preparation, not stop with the old reason."""
    done, failed = tmp_path / "done", tmp_path / "failed"
    for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_STEP_ID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    failed.write_text("launch: slurm:77.1.0#0\nValueError: the previous step's typo\n")
    polls = []

    def rank0_meanwhile(seconds):  # rank 0 removes the old failure and prepares
        polls.append(seconds)
        failed.unlink(missing_ok=True)
        if len(polls) == 3:
            done.write_text("ok")

    monkeypatch.setattr("dsmoe.distributed.time.sleep", rank0_meanwhile)
    wait_for(done, failed, "prepare")
    assert len(polls) == 3

    # without a launch id (torchrun's default --rdzv-id), or one that differs only in the restart count torchrun keeps
    # per node: believed once it has stayed stale_seconds
    done.unlink()
    clock = [0.0]
    monkeypatch.setattr("dsmoe.distributed.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("dsmoe.distributed.time.sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    failed.write_text("launch: slurm:77.2.0#1\nValueError: bad option\n")  # rank 0's node restarted, ours did not
    with pytest.raises(RuntimeError, match="rank 0 failed to prepare: ValueError: bad option"):
        wait_for(done, failed, "prepare", poll_seconds=5, stale_seconds=120)
    assert clock[0] == 120
    monkeypatch.delenv("SLURM_JOB_ID")
    clock[0] = 0.0
    failed.write_text("launch: \nValueError: bad option\n")
    with pytest.raises(RuntimeError, match="rank 0 failed to prepare: ValueError: bad option"):
        wait_for(done, failed, "prepare", poll_seconds=5, stale_seconds=120)
    assert clock[0] == 120


def _validate(rank, world, windows, result):
    """LitCausalLM's validation over this rank's share of 11 held-out windows; what it logs (rank 0 writes it)."""
    import json

    from tiny_models import tiny_model
    from torch.utils.data import DataLoader

    from dsmoe import convert
    from dsmoe.config import DSMoEConfig
    from dsmoe.data.datamodule import validation_share
    from dsmoe.lit import LitCausalLM, OptimConfig
    from dsmoe.methods import get_method

    torch.set_num_threads(1)
    model = convert(tiny_model("llama", seed=3), DSMoEConfig(num_experts=4, tau=0.5)).eval()
    lit = LitCausalLM(model, get_method("dsmoe"), OptimConfig(), dense_params=1)
    logged = {}
    lit.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    lit.eval()  # as Lightning's validation loop sets it
    lit.on_validation_epoch_start()
    with torch.no_grad():
        for batch in DataLoader(validation_share(windows, 1.0, 2, rank, world), batch_size=2):
            lit.validation_step(batch, 0)
    lit.on_validation_epoch_end()
    if rank == 0:
        with open(result, "w") as f:
            json.dump(logged, f)


def _validate_worker(rank, init_file, windows, result):
    from datetime import timedelta

    dist.init_process_group(  # a rank left waiting fails the test instead of hanging it
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    _validate(rank, WORLD, windows, result)
    dist.destroy_process_group()


@pytest.mark.parametrize("num_windows", [11, 1])
def test_validation_over_two_ranks_logs_what_one_process_does(tmp_path, num_windows):
    """val/ppl and the activation statistics over 2 ranks (one of them with a filler window: 11 windows; with only
    fillers: 1 window, where a rank that skipped the metric's sync left the other waiting forever) equal one
    process's over all windows: each window once, fillers neither in the perplexity nor in the counts."""
    import json

    torch.manual_seed(0)
    windows = torch.randint(0, 256, (num_windows, 17))
    _validate(0, 1, windows, tmp_path / "one.json")
    mp.spawn(_validate_worker, args=(str(tmp_path / "init"), windows, tmp_path / "two.json"), nprocs=WORLD, join=True)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (
        one.keys() == two.keys() and {"val/ppl", "val/mean_active_experts", "val/activated_params_frac"} <= one.keys()
    )
    assert 0 < one["val/mean_active_experts"] < 4
    assert two == pytest.approx(one, rel=1e-5)
