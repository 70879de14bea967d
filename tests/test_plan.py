"""Disk plans (./reproduce.sh TARGET --scale S --plan): offline meta-device models of the paper's two Llamas with the
paper's parameter counts, the suite's checkpoint/export behaviour, and planned sizes against real saved files."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dsmoe import plan as dp
from dsmoe.models import CONFIGS_DIR
from dsmoe.stats import count_params
from dsmoe.targets import runs_in_order, target_labels

ROOT = Path(__file__).resolve().parent.parent
ALL_RUNS = [
    "dense",
    "dsmoe",
    "llm_pruner_channel",
    "llm_pruner_block",
    "sparsegpt",
    "llama_moe",
    "dsmoe_no_ste",
    "dsmoe_no_gate",
]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network, an empty HF cache and suite cache, and no earlier runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("the plan opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HOME", tmp_path / "hf"), ("DSMOE_CACHE", tmp_path / "cache")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("DSMOE_RUNS", str(tmp_path / "runs"))
    return tmp_path


def test_llama1b_all(offline):
    plan = dp.plan_target("all", "llama1b")
    assert plan.dense_params == 1_235_814_400 and round(plan.dense_params / 1e7) == 124  # Table 1: 1.24B
    assert plan.dense_dtype == "bfloat16" and plan.dense_bytes == 2 * plan.dense_params
    assert [r.run for r in plan.runs] == ALL_RUNS
    assert "paper's Table 1 (735M of 1.24B)" in plan.fraction_source
    dsmoe = plan.run("dsmoe")
    assert dsmoe.params == plan.dense_params + 16 * 2048 * 8  # routers
    assert dsmoe.steps == 305176 and dsmoe.tokens == 305176 * 32 * 1024
    assert dsmoe.checkpoint_bytes == 12 * dsmoe.params and dsmoe.checkpoints_written == 152
    assert dsmoe.checkpoints_kept == 2 and not dsmoe.keep_checkpoints
    assert [point for point, _ in dsmoe.exports] == [2.2e9, 3.8e9, 5.4e9, 7.0e9, 7.8e9, 8.6e9]
    assert dsmoe.exports[0][1] == 67139  # the first step past 2.2B tokens
    assert dsmoe.export_dtype == "bfloat16" and dsmoe.export_bytes == 2 * dsmoe.params
    assert dsmoe.init_dtype == "float32" and dsmoe.init_model_bytes == 4 * dsmoe.params  # fp32 master weights
    # peak of the run: init_model + 3 checkpoints (while the third is written) + the 6 exports; kept: exports + final
    assert dsmoe.peak_bytes == dsmoe.init_model_bytes + 3 * dsmoe.checkpoint_bytes + 6 * dsmoe.export_bytes
    assert dsmoe.kept_bytes == 7 * dsmoe.export_bytes
    for baseline in ("llm_pruner_channel", "llm_pruner_block", "sparsegpt", "llama_moe"):
        run = plan.run(baseline)
        assert not run.exports and run.kept_bytes == run.final_bytes
    assert abs(plan.run("llm_pruner_block").params / plan.dense_params - 735 / 1240) < 0.005  # matched to 735M
    channel = plan.run("llm_pruner_channel")  # matched with the embedding counted once, then untied: Table 1's row
    assert channel.setting == "d=1214" and round(channel.params / 1e6) == 888  # the paper: d=1215, 889M
    assert plan.run("sparsegpt").params == plan.dense_params  # zeros are stored
    assert plan.peak_bytes <= 100e9
    assert format_lines(plan)[-1] == f"peak disk: {plan.peak_bytes / 1e9:.1f} GB"


def test_llama7b_all(offline):
    plan = dp.plan_target("all", "llama7b")
    assert plan.dense_params == 6_738_415_616 and round(plan.dense_params / 1e7) == 674  # Table 1: 6.74B
    assert plan.dense_dtype == "float16" and plan.dense_bytes == 2 * plan.dense_params
    dsmoe = plan.run("dsmoe")
    assert dsmoe.steps == 305176 and dsmoe.checkpoints_written == 152
    assert dsmoe.params == plan.dense_params + 32 * 4096 * 8
    assert dsmoe.checkpoint_bytes == 12 * dsmoe.params
    assert [point for point, _ in dsmoe.exports] == [2.4e9, 3.2e9, 4.8e9, 6.4e9, 8.0e9, 9.6e9]
    assert dsmoe.init_dtype == "float32" and dsmoe.export_dtype == "bfloat16"  # fp32 master weights, bf16 exports
    for pruner in ("llm_pruner_channel", "llm_pruner_block"):  # matched to 3.93B of 6.74B
        assert abs(plan.run(pruner).params / 3.93e9 - 1) < 0.005
    assert plan.peak_bytes <= 500e9


def format_lines(plan):
    return dp.format_plan(plan).splitlines()


def test_measured_dsmoe_fraction_replaces_the_papers(offline):
    eval_json = offline / "runs" / "llama1b" / "dsmoe" / "eval.json"
    eval_json.parent.mkdir(parents=True)
    eval_json.write_text(json.dumps({"activated_fraction": 0.55}))
    plan = dp.plan_target("table1", "llama1b")
    assert plan.dsmoe_fraction == 0.55 and "measured" in plan.fraction_source
    assert abs(plan.run("llm_pruner_block").params / plan.dense_params - 0.55) < 0.005
    # LLM-Pruner-block prunes layers 4..13 of 16 only: it cannot go below ~52% of Llama-3.2-1B
    eval_json.write_text(json.dumps({"activated_fraction": 0.5}))
    with pytest.raises(ValueError, match="run 'llm_pruner_block' of scale 'llama1b': target .* is outside"):
        dp.plan_target("table1", "llama1b")


def test_a_local_copy_of_a_paper_model_plans_with_that_models_table_1_fraction(offline, monkeypatch):
    """An offline node's scale copy names the model by its directory: the plan recognises Llama-2-7B by its structure
    and matches the baselines to 7B's Table 1 fraction (3.93B of 6.74B), not to the 1B fallback."""
    local = offline / "Llama-2-7b-hf"
    local.mkdir()
    (local / "config.json").write_text((CONFIGS_DIR / "llama-2-7b-hf.json").read_text())
    scale = (ROOT / "experiments/configs/scales/llama7b.yaml").read_text()
    assert "model: meta-llama/Llama-2-7b-hf\n" in scale
    (offline / "scales").mkdir()
    (offline / "scales" / "llama7b.yaml").write_text(scale.replace("meta-llama/Llama-2-7b-hf", str(local)))
    monkeypatch.setenv("DSMOE_SCALES_DIR", str(offline / "scales"))
    plan = dp.plan_target("table1", "llama7b")
    assert plan.config_source == f"local directory {local} (already on disk, not counted)"
    assert plan.dense_bytes == 0  # the user's own copy is on disk already
    assert f"(3.93B of 6.74B for meta-llama/Llama-2-7b-hf, whose structure {local} has)" in plan.fraction_source
    assert abs(plan.run("llm_pruner_block").params / 3.93e9 - 1) < 0.005
    other = json.loads((local / "config.json").read_text()) | {"num_hidden_layers": 30}
    (local / "config.json").write_text(json.dumps(other))
    assert f"for Llama-3.2-1B, assumed for {local})" in dp.plan_target("table1", "llama7b").fraction_source


def test_demo_scale_plan(offline):
    plan = dp.plan_target("table1", "demo")  # DSMOE_CACHE is empty: the shipped config of the embedded model
    assert plan.dense_params == 134_515_008 and plan.dense_dtype == "float32"
    assert plan.config_source.startswith("embedded model")
    dsmoe = plan.run("dsmoe")
    assert dsmoe.precision == "32-true" and dsmoe.export_dtype == "float32"
    assert dsmoe.steps == 20 and dsmoe.checkpoints_written == 4
    assert [step for _, step in dsmoe.exports] == [5, 10, 15]
    # the peak of the run: the checkpoint at step 20 written after the three exports
    assert dsmoe.peak_bytes == dsmoe.init_model_bytes + 3 * dsmoe.checkpoint_bytes + 3 * dsmoe.export_bytes
    lines = format_lines(plan)
    assert lines[-1].startswith("peak disk: ") and lines[-1].endswith(" GB")
    assert sum(line.startswith("peak disk") for line in lines) == 1


def test_disk_events_rotate_and_clean_up():
    run = dp.RunPlan("r", ["R"], "dsmoe", steps=10, checkpoint_every=2, checkpoints_kept=2, exports=[(30, 3)])
    run.init_model_bytes, run.checkpoint_bytes, run.export_bytes = 1000, 100, 10
    events = dp.disk_events(run)
    deltas = [delta for _, delta in events]
    # init, ckpt 2, export 3, ckpt 4, ckpt 6 (rotation), ckpt 8 after the same files: listed once; final; cleanup
    assert deltas == [1000, 100, 10, 100, 100, -100, 10, -1200]
    assert run.peak_bytes == max(dp._running(events)) == 1000 + 300 + 10
    assert run.kept_bytes == 20  # the export and final/
    ends = [line.split(",")[-1] for line in dp.describe_run(run, 0)[2:4]]  # init_model/, checkpoints/
    assert ends == [" weights deleted when the run finishes", " deleted when the run finishes"]
    run.keep_checkpoints = True
    assert sum(delta for _, delta in dp.disk_events(run)) == 1000 + 200 + 20
    ends = [line.split(",")[-1] for line in dp.describe_run(run, 0)[2:4]]
    assert ends == [" weights kept at the end", " kept at the end"]
    few = dp.RunPlan("f", ["F"], "dsmoe", steps=4, checkpoint_every=2, checkpoints_kept=3)  # 2 written, 3 kept
    few.init_model_bytes, few.checkpoint_bytes, few.export_bytes = 1000, 100, 10
    assert [delta for _, delta in dp.disk_events(few)] == [1000, 100, 100, 10, -1200]
    assert few.kept_bytes == 10  # only final/ is left: the cleanup deletes the checkpoints that were written


def test_runs_in_order_trains_dsmoe_before_the_baselines_that_match_it():
    available = ["dsmoe", "sparsegpt", "llama_moe"]
    assert runs_in_order("table2", available, ["sparsegpt", "llama_moe"]) == [
        "dense",
        "dsmoe",
        "sparsegpt",
        "llama_moe",
    ]
    assert runs_in_order("fig2", ["dsmoe", "dsmoe_no_gate"]) == ["dsmoe_no_gate", "dsmoe"]
    assert [run for run, _ in target_labels("table6")] == ["dsmoe"]
    with pytest.raises(ValueError, match="unknown target 'table9'"):
        target_labels("table9")
    with pytest.raises(ValueError, match="defines no 'dsmoe' run"):
        runs_in_order("table1", ["sparsegpt"], ["sparsegpt"])


def test_bad_input_is_named(offline, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="config.json of model 'org/not-cached' is needed offline"):
        dp.model_config("org/not-cached")
    scales = tmp_path / "scales"
    scales.mkdir()
    scale = yaml.safe_load((ROOT / "experiments" / "configs" / "scales" / "llama1b.yaml").read_text())
    scale["base"]["trainer"]["checkpoint_every_n_steps"] = 0
    (scales / "bad.yaml").write_text(yaml.safe_dump(scale))
    monkeypatch.setenv("DSMOE_SCALES_DIR", str(scales))
    with pytest.raises(ValueError, match="run 'dsmoe' of scale 'bad': trainer.checkpoint_every_n_steps must be a pos"):
        dp.plan_target("table5", "bad")
    scale["base"]["trainer"]["checkpoint_every_n_steps"] = 2000
    scale["methods"]["dsmoe"]["trainer"]["export_tokens"] = [2e10]
    (scales / "bad.yaml").write_text(yaml.safe_dump(scale))
    with pytest.raises(
        ValueError, match=r"'bad': trainer.export_tokens 20000000000.0 is not a token count in \(0, 10000007168\]"
    ):
        dp.plan_target("table5", "bad")
    scale["methods"]["dsmoe"]["trainer"]["export_tokens"] = [10000007168]  # the run's last step: allowed
    (scales / "bad.yaml").write_text(yaml.safe_dump(scale))
    run = dp.plan_target("table5", "bad").run("dsmoe")
    assert run.exports == [(10000007168, run.steps)]


@pytest.mark.parametrize(
    "trainer, message",
    [
        (
            {"global_batch_size": 5, "micro_batch_size": 2},
            r"trainer.global_batch_size=5 is not divisible by .* = 2 × 1 = 2",
        ),
        (
            {"devices": 3},
            r"trainer.global_batch_size=32 is not divisible by micro_batch_size × processes \(devices × num_nodes\) = 4 × 3 = 12",
        ),
        (
            {"devices": "0,1,2", "micro_batch_size": 8},
            r"trainer.global_batch_size=32 is not divisible by .* = 8 × 3 = 24",
        ),
        ({"devices": -1, "num_nodes": 3}, r"trainer.global_batch_size=32 is not divisible by .* = 4 × 3 = 12"),
        ({"micro_batch_size": 0}, r"trainer.micro_batch_size must be a positive integer, got 0"),
        ({"max_steps": -1, "max_tokens": 0}, r"set trainer.max_tokens \(preferred\) or trainer.max_steps"),
    ],
)
def test_the_plan_refuses_a_batch_schedule_the_run_refuses(offline, tmp_path, monkeypatch, trainer, message):
    """dsmoe.train.schedule's checks, on the configured devices (one per node where the machine decides)."""
    scale = yaml.safe_load((ROOT / "experiments" / "configs" / "scales" / "llama1b.yaml").read_text())
    scale["base"]["trainer"].update(trainer)
    (tmp_path / "scales").mkdir()
    (tmp_path / "scales" / "bad.yaml").write_text(yaml.safe_dump(scale))
    monkeypatch.setenv("DSMOE_SCALES_DIR", str(tmp_path / "scales"))
    with pytest.raises(ValueError, match="run 'dsmoe' of scale 'bad': " + message):
        dp.main(["table1", "--scale", "bad"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0"], "--seeds must be a positive number of repetitions, got 0"),
        (["--seeds", "-2"], "--seeds must be a positive number of repetitions, got -2"),
        (["--limit", "0"], "--limit must be a positive number of benchmark items per task, got 0"),
        (["--scale", "../scales/demo"], r"scale '../scales/demo' is not a plain name"),
    ],
)
def test_plan_arguments_are_checked_as_the_targets_check_them(offline, argv, message):
    with pytest.raises(ValueError, match=message):
        dp.main(["table1", *argv])


@pytest.mark.parametrize("method", ["dsmoe", "llama_moe", "llm_pruner_block", "sparsegpt"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_planned_final_size_matches_a_real_save(tmp_path, assets, write_scale, method, dtype):
    from dsmoe.baselines.llm_pruner import options_plan, prune_with_plan
    from dsmoe.methods import get_method, match_options
    from dsmoe.models import load_model

    write_scale(["dsmoe", method])
    path = tmp_path / "scales" / "tiny.yaml"
    scale = yaml.safe_load(path.read_text())
    scale["base"]["trainer"]["export_dtype"] = dtype
    path.write_text(yaml.safe_dump(scale))
    plan = dp.plan_target("table1", "tiny")
    planned = plan.run(method)

    model, _ = load_model(str(assets / "model"))
    options = {k: v for k, v in scale["methods"][method]["method_options"].items() if k != "match_activated"}
    if method != "dsmoe":
        options.update(match_options(method, model, plan.dsmoe_fraction, options).options)
    if method == "llm_pruner_block":
        _, shapes = options_plan(model, "block", options)
        prune_with_plan(model, shapes, [torch.randint(0, 256, (2, 16))])
    elif method != "sparsegpt":  # SparseGPT keeps the dense shapes
        model = get_method(method).apply(model, options, None)
    assert count_params(model) == planned.params
    out = tmp_path / "saved"
    model.to(getattr(torch, dtype)).save_pretrained(out)
    saved = sum(f.stat().st_size for f in out.glob("model*.safetensors"))
    assert abs(planned.final_bytes / saved - 1) < 0.03, (planned.final_bytes, saved)
    assert planned.init_dtype == "float32" and planned.init_model_bytes == 4 * planned.params  # training weights


@pytest.mark.slow
def test_reproduce_plan_cli_offline(tmp_path):
    """./reproduce.sh's --plan routing, in a fresh process with the hub unreachable and empty caches. Its venv is a
    wrapper around this interpreter, stamped as installed, so that nothing is installed."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    stamp = subprocess.run(["sha256sum", str(ROOT / "pyproject.toml")], capture_output=True, text=True, check=True)
    (venv / ".dsmoe-installed").write_text(stamp.stdout[:16] + "\n")
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "DSMOE_CACHE": str(tmp_path / "cache"),
        "DSMOE_RUNS": str(tmp_path / "runs"),
        "DSMOE_VENV": str(venv),
        "PYTHONPATH": str(ROOT),
    }
    command = ["bash", str(ROOT / "reproduce.sh"), "table3", "--scale", "llama7b", "--plan"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "Disk plan: table3 at scale llama7b (nothing trained, loaded or downloaded)"
    assert out[-1] == f"peak disk: {dp.plan_target('table3', 'llama7b').peak_bytes / 1e9:.1f} GB"
    bad = subprocess.run(command[:2] + ["demo", "--plan"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--plan works with a target" in bad.stderr


def test_reproduce_help_prints_the_header_comment(tmp_path):
    """./reproduce.sh help: the usage block at the top of the script, whatever its length, without the '#'s."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DSMOE_VENV": str(tmp_path / "no-venv")}
    out = subprocess.run(["bash", str(ROOT / "reproduce.sh"), "help"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = (ROOT / "reproduce.sh").read_text().splitlines()[1:]
    header = header[: next(i for i, line in enumerate(header) if not line.startswith("#"))]
    assert len(lines) == len(header) > 5
    assert lines[0].startswith("One command per result") and not any(line.startswith("#") for line in lines)
    for target in ("demo", "test", "setup", "gpu-check", "--plan", "table6", "DSMOE_RESULTS"):
        assert target in out.stdout
    command = ["bash", f"{ROOT.name}/reproduce.sh", "help"]  # started from another directory
    elsewhere = subprocess.run(command, env=env, cwd=ROOT.parent, capture_output=True, text=True)
    assert elsewhere.returncode == 0 and elsewhere.stdout == out.stdout, elsewhere.stderr
