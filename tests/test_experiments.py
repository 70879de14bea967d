"""Experiment scripts end to end on a tiny scale: every target writes its CSV/PNG with the paper's columns
and provenance; an interrupted target re-run completes without redoing finished runs."""

import importlib
import os
import re
from pathlib import Path

import pytest
import yaml

from dsmoe.results import PROVENANCE, read_csv

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture
def tiny_scale(write_scale):
    return write_scale(["dsmoe", "sparsegpt", "llama_moe"])


@pytest.fixture
def tiny_scale_all(write_scale):
    return write_scale(["dsmoe", "dsmoe_no_ste", "dsmoe_no_gate", "llama_moe", "sparsegpt", "llm_pruner_block"])


def run_script(name, *argv):
    module = importlib.import_module(name)
    module.main(["--scale", "tiny", *argv])


def test_table1_rerun_after_interruption_skips_finished_runs(tiny_scale, monkeypatch, capsys):
    import dsmoe.experiment
    from dsmoe.train import load_config, train

    trained = []

    def counting_launch(config_file):  # in this process, to keep the test fast (test_ddp_table1 runs the real one)
        cfg = load_config(config_file)
        trained.append(cfg.run_name)
        if cfg.run_name == "sparsegpt" and trained.count("sparsegpt") == 1:
            raise KeyboardInterrupt  # the target is interrupted half-way
        train(cfg)

    monkeypatch.setattr(dsmoe.experiment, "launch_training", counting_launch)
    with pytest.raises(KeyboardInterrupt):
        run_script("table1")
    assert trained == ["dsmoe", "sparsegpt"]
    run_script("table1")  # re-run: only the interrupted and the missing runs train
    assert trained[2:] == ["sparsegpt", "llama_moe"]
    assert "scale 'tiny' defines no run ['llm_pruner_channel', 'llm_pruner_block']: left out" in capsys.readouterr().err
    rows = read_csv(tiny_scale / "results" / "tiny" / "table1_ppl.csv")
    assert [r["Model"] for r in rows] == ["dense (no training)", "SparseGPT", "LLaMA-MoE", "DSMoE"]
    for col in ["Configuration", "Params", "Activated Params", "PPL", "PPL a", "PPL b", *PROVENANCE]:
        assert all(r[col] != "" for r in rows[1:] if col != "tau" or r["Model"] == "DSMoE"), col
    assert all(r["seeds"] == "1" and r["PPL sd"] == r["Params sd"] == "" for r in rows)  # undefined, not 0
    by_model = {r["Model"]: r for r in rows}
    assert abs(float(by_model["SparseGPT"]["Activated %"]) - float(by_model["DSMoE"]["Activated %"])) < 1.0
    assert by_model["DSMoE"]["Configuration"] == "d=64, D=32x4"
    assert by_model["LLaMA-MoE"]["Configuration"].startswith("d=64, D=16x8, topK=")
    assert by_model["dense (no training)"]["tokens"] == "0" and by_model["DSMoE"]["tokens"] == "512"
    # where a run trained (its rank 0 recorded it) and where it was evaluated: at paper scale 8 GPUs vs the driver's
    assert re.fullmatch(
        r"trained on 1 CPU .+, single_device; evaluated on CPU .+, \d+ threads, float32", by_model["DSMoE"]["hardware"]
    )


def test_table2_trains_its_runs_in_the_order_the_plan_prints(tiny_scale, monkeypatch):
    """The plan lists DSMoE's seeds before the baselines that match them, seed by seed; Table 2 (which scores the
    models in Table 1's order, DSMoE last) had interleaved them: dsmoe, sparsegpt, dsmoe_seed1, ..."""
    import dsmoe.experiment
    from dsmoe.plan import plan_target
    from dsmoe.train import load_config, train

    trained = []

    def counting_launch(config_file):
        cfg = load_config(config_file)
        trained.append(cfg.run_name)
        if len(trained) == 3:
            raise KeyboardInterrupt  # enough to see the order
        train(cfg)

    monkeypatch.setattr(dsmoe.experiment, "launch_training", counting_launch)
    with pytest.raises(KeyboardInterrupt):
        run_script("table2", "--seeds", "2", "--limit", "1")
    planned = [r.run for r in plan_target("table2", "tiny", seeds=2).runs if r.method != "dense"]
    assert trained == planned[:3] == ["dsmoe", "dsmoe_seed1", "sparsegpt"]


def test_the_spread_of_one_seed_is_undefined_not_zero(tmp_path):
    from dsmoe.experiment import mean_sd, plus_minus
    from dsmoe.results import write_csv

    assert mean_sd([2.0, 4.0]) == (3.0, pytest.approx(2**0.5))  # sample sd: n - 1
    mean, sd = mean_sd([2.0])
    assert mean == 2.0 and sd != sd  # NaN
    assert plus_minus(3.0, 2**0.5) == "3.000 ± 1.414" and plus_minus(2.0, sd, 2) == "2.00"
    rows = read_csv(write_csv(tmp_path / "t.csv", [{"PPL": mean, "PPL sd": sd}], ["PPL", "PPL sd"]))
    assert rows == [{"PPL": "2", "PPL sd": ""}]


def test_table1_counts_are_means_over_seeds_whose_models_differ_in_size():
    """LLM-Pruner is matched seed by seed: each seed's pruned model has its own size, so Params is a mean (with its
    sd) like Activated Params, not the first seed's count (a pruned model's two counts must agree)."""
    from dsmoe.experiment import table_row

    def result(seed, width, params):
        provenance = {"seed": seed, "model": "m", "tokens": 1}
        return {"configuration": f"d={width}", "params": params, "activated_params": params, "activated_fraction": 0.8,
                "ppl": 10.0 + seed, "ppl_per_source": {"a": 10.0 + seed}, "provenance": provenance}  # fmt: skip

    row = table_row([result(0, 461, 1000), result(1, 448, 900), result(2, 437, 800)], "LLM-Pruner-channel")
    assert row["Params"] == row["Activated Params"] == 900 and row["Params sd"] == pytest.approx(100)
    assert row["Configuration"] == "d=461 | d=448 | d=437" and row["seed"] == "0,1,2"


@pytest.mark.parametrize(
    "setting, message",
    [({"batch_size": 0}, "eval.batch_size is 0"), ({"protocol": "document"}, "eval.protocol is 'document'")],
)
def test_a_bad_eval_setting_stops_the_target_before_training(write_scale, monkeypatch, setting, message):
    import dsmoe.experiment

    path = write_scale(["dsmoe"]) / "scales" / "tiny.yaml"
    scale = yaml.safe_load(path.read_text())
    scale["eval"].update(setting)
    path.write_text(yaml.safe_dump(scale))
    monkeypatch.setattr(dsmoe.experiment, "launch_training", lambda config_file: pytest.fail("training started"))
    with pytest.raises(ValueError, match=f"scale 'tiny' {message}"):
        run_script("table1")
    assert not (path.parent.parent / "runs").exists()


@pytest.mark.slow
def test_every_figure_and_table_target(tiny_scale_all):
    run_script("table1")
    assert len(read_csv(tiny_scale_all / "results" / "tiny" / "table1_ppl.csv")) == 5
    run_script("tau_sweep")
    taus = read_csv(tiny_scale_all / "results" / "tiny" / "table4_tau.csv")
    acts = [float(r["activated params %"]) for r in taus]
    assert [float(r["tau"]) for r in taus] == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8] and acts == sorted(acts, reverse=True)
    run_script("ablation_no_gate")
    fig2 = read_csv(tiny_scale_all / "results" / "tiny" / "fig2_no_gate.csv")
    assert fig2[-1]["run"] == "DSMoE" and len(fig2) == 2 * 19 + 1
    assert [r["rescale"] for r in fig2[:-1]] == ["True"] * 19 + ["False"] * 19
    assert (tiny_scale_all / "results" / "tiny" / "fig2_no_gate.png").stat().st_size > 0
    run_script("heatmap")
    heat = read_csv(tiny_scale_all / "results" / "tiny" / "fig3_heatmap.csv")
    assert [r["source"] for r in heat] == ["a", "b", "a sd", "b sd"]
    assert all(r["layer_00"] == "" for r in heat[2:])  # one seed: its spread is undefined, not 0
    run_script("token_curve")
    curve = read_csv(tiny_scale_all / "results" / "tiny" / "tables5_6_tokens.csv")
    assert [int(r["steps"]) for r in curve] == [1, 2, 4] and [int(r["Tokens"]) for r in curve] == [128, 256, 512]
    assert all(r["hardware"].startswith("trained on 1 CPU ") for r in curve)  # exports too: where the run trained
    run_script("ablation_ste")
    rows = read_csv(tiny_scale_all / "results" / "tiny" / "table3_ablation_ste.csv")
    assert [r["Model"] for r in rows][-2:] == ["PPL", "Activated %"] and rows[0]["limit"] == "2"
    assert {r["Model"] for r in rows} >= {"Hellaswag", "WebQs", "StoryCloze"}
    by_measure = {r["Model"]: r for r in rows}
    assert float(by_measure["Hellaswag"]["DSMoE se"]) >= 0 and by_measure["PPL"]["DSMoE se"] == ""  # items' se
    run_script("table2")
    rows = read_csv(tiny_scale_all / "results" / "tiny" / "table2_benchmarks.csv")
    assert [r["Model"] for r in rows][0] == "dense (no training)" and len(rows) == 5
    for r in rows:  # lm-eval's standard error over the items, sample sd / sqrt(n): 0 or 50 points for 2 items
        assert r["PIQA se"] in ("0", "50") and r["StoryCloze se"] == "" and r["Hellaswag sd"] == ""


def test_validation_windows_are_read_once_per_data_config(tiny_scale, assets):
    from dsmoe.experiment import validation_windows
    from dsmoe.models import load_tokenizer

    tok = load_tokenizer(str(assets / "model"))
    first = validation_windows("tiny", tok)
    assert validation_windows("tiny", tok) is first
    assert set(first) == {"a", "b"} and all(len(w) == 2 for w in first.values())
    path = tiny_scale / "scales" / "tiny.yaml"
    scale = yaml.safe_load(path.read_text())
    scale["eval"]["val_windows"] = 1
    path.write_text(yaml.safe_dump(scale))
    changed = validation_windows("tiny", tok)
    assert all(len(w) == 1 for w in changed.values())
    assert all(w.equal(first[name][:1]) for name, w in changed.items())


def test_cached_evaluation_is_recomputed_when_its_settings_change(tiny_scale, monkeypatch):
    import dsmoe.experiment as de

    first = de.evaluate("tiny", "dense")
    path = tiny_scale / "runs" / "tiny" / "dense" / "eval.json"
    assert yaml.safe_load(path.read_text())["evaluated_with"]["val_windows"] == 2 and "evaluated_with" not in first
    loads = []
    load_for_eval = de.load_for_eval
    monkeypatch.setattr(de, "load_for_eval", lambda source: loads.append(source) or load_for_eval(source))
    assert de.evaluate("tiny", "dense") == first and loads == []  # same settings: the cached result
    scale_file = tiny_scale / "scales" / "tiny.yaml"
    scale = yaml.safe_load(scale_file.read_text())
    scale["eval"]["val_windows"] = 1
    scale_file.write_text(yaml.safe_dump(scale))
    fewer = de.evaluate("tiny", "dense")
    assert len(loads) == 1 and fewer["eval_tokens"] == first["eval_tokens"] // 2 and fewer["ppl"] != first["ppl"]
    assert de.evaluate("tiny", "dense") == fewer and len(loads) == 1


def test_eval_dtype_is_chosen_by_dsmoe_eval_dtype(tiny_scale, monkeypatch):
    """DSMOE_EVAL_DTYPE (e.g. float16/float32 on GPUs without bf16): the model is evaluated in it, the cached result
    is recomputed, and a bad value is refused when the target starts, naming what is allowed."""
    import torch

    import dsmoe.experiment as de

    fp32 = de.evaluate("tiny", "dense")
    monkeypatch.setenv("DSMOE_EVAL_DTYPE", "bfloat16")
    assert de.evaluation_precision() == "cpu torch.bfloat16"
    model, _ = de.load_for_eval(de.scale_config("tiny").base.model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    bf16 = de.evaluate("tiny", "dense")
    assert bf16["ppl"] != fp32["ppl"] and bf16["ppl"] == pytest.approx(fp32["ppl"], rel=0.05)
    monkeypatch.setenv("DSMOE_EVAL_DTYPE", "bf16")
    with pytest.raises(ValueError, match=r"DSMOE_EVAL_DTYPE='bf16' is not one of bfloat16, float16, float32"):
        de.parse_scale("table1", ["--scale", "tiny"])


def test_evaluation_on_gpus_runs_in_a_child_process(tiny_scale, monkeypatch):
    """Where there are GPUs the driver measures in a spawned child (DSMOE_EVAL_IN_CHILD=1 does so on the CPU): the
    driver holds no CUDA context while the runs it starts next train. Same result as in the driver itself."""

    import dsmoe.experiment as de

    here = de.evaluate("tiny", "dense")
    (tiny_scale / "runs" / "tiny" / "dense" / "eval.json").unlink()
    monkeypatch.setenv("DSMOE_EVAL_IN_CHILD", "1")
    loads = []
    monkeypatch.setattr(de, "load_for_eval", lambda source: loads.append(source))  # the child has the real one
    child = de.evaluate("tiny", "dense")
    assert loads == [] and child.pop("provenance")["model"] == here.pop("provenance")["model"]
    assert child == here
    assert de.on_the_gpus(os.getpid) != os.getpid()
    with pytest.raises(ValueError, match="invalid literal"):  # a child's error reaches the driver
        de.on_the_gpus(int, "x")


def where_it_ran(x, device):

    return x * x, str(device), os.getpid()


def test_calls_share_the_devices_one_child_each(monkeypatch):
    """Table 2's lm-eval, one model per GPU: each call in a child process on a device of its own, every call done
    (here 2 CPU "devices" stand in for GPUs, with DSMOE_EVAL_IN_CHILD=1)."""

    import torch

    import dsmoe.experiment as de

    monkeypatch.setenv("DSMOE_EVAL_IN_CHILD", "1")
    results = {}
    devices = [torch.device("cpu", 0), torch.device("cpu", 1)]
    de.on_each_device(where_it_ran, [(i,) for i in range(5)], devices, lambda i, r: results.setdefault(i, r))
    assert sorted(results) == list(range(5)) and [results[i][0] for i in range(5)] == [0, 1, 4, 9, 16]
    assert {r[1] for r in results.values()} == {"cpu:0", "cpu:1"}
    pids = {r[2] for r in results.values()}
    assert os.getpid() not in pids and len(pids) == 5  # a fresh process per call: none moves to another device
    monkeypatch.delenv("DSMOE_EVAL_IN_CHILD")
    here = []
    de.on_each_device(where_it_ran, [(3,)], devices, lambda i, r: here.append(r))
    assert here == [(9, "cpu:0", os.getpid())]  # on the CPU: in this process


def fails_on_two(x, device):
    import time

    if x == 2:
        raise ValueError("call 2 failed")
    time.sleep(1 if x == 1 else 0)
    return x


def test_a_failing_call_keeps_the_others_results(monkeypatch):
    """One model's lm-eval failing must not throw away the scores the other GPUs finished meanwhile."""
    import torch

    import dsmoe.experiment as de

    monkeypatch.setenv("DSMOE_EVAL_IN_CHILD", "1")
    results = {}
    devices = [torch.device("cpu", 0), torch.device("cpu", 1)]
    with pytest.raises(ValueError, match="call 2 failed"):
        de.on_each_device(fails_on_two, [(1,), (2,), (3,), (4,)], devices, lambda i, r: results.setdefault(i, r))
    assert results[0] == 1  # running when call 2 failed: finished and kept; none started after the failure
    assert 2 not in results.values() and 4 not in results.values()


def test_held_out_sequences_go_to_a_child_as_one_tensor_per_source():
    """20,000 documents as 20,000 tensors would be 20,000 shared-memory files (too many open files)."""
    import torch

    from dsmoe.experiment import packed_sequences, unpacked_sequences

    documents = [torch.arange(n) for n in (5, 1, 9)]
    flat, lengths = packed_sequences(documents)
    assert flat.ndim == 1 and lengths == [5, 1, 9]
    assert all(torch.equal(a, b) for a, b in zip(unpacked_sequences((flat, lengths)), documents, strict=True))
    windows = torch.arange(12).reshape(3, 4)
    assert torch.equal(torch.stack(unpacked_sequences(packed_sequences(windows))), windows)


def test_a_run_trained_with_other_settings_is_refused_not_reused(write_scale, monkeypatch):
    import dsmoe.experiment as de
    from dsmoe.train import load_config, train

    scale_dir = write_scale(["dsmoe", "sparsegpt"])
    monkeypatch.setattr(de, "launch_training", lambda config_file: train(load_config(config_file)))
    de.ensure_run("tiny", "sparsegpt")  # matched to the DSMoE run's measured fraction: trains dsmoe first
    path = scale_dir / "scales" / "tiny.yaml"
    scale = yaml.safe_load(path.read_text())
    scale["base"]["trainer"].update(devices=1, checkpoint_every_n_steps=4, limit_val_batches=2)  # not the result's
    scale["eval"]["val_windows"] = 1
    path.write_text(yaml.safe_dump(scale))
    assert de.ensure_run("tiny", "dsmoe").name == "final" and de.ensure_run("tiny", "sparsegpt").name == "final"
    scale["methods"]["dsmoe"]["method_options"]["tau"] = 0.9
    scale["base"]["trainer"]["max_steps"] = 6
    path.write_text(yaml.safe_dump(scale))
    message = r"runs/tiny/dsmoe holds a run with other settings .*method_options.tau: 0.5 \(run\) vs 0.9 \(now\)"
    with pytest.raises(ValueError, match=message + r".*trainer.max_steps: 4 \(run\) vs 6"):
        de.ensure_run("tiny", "dsmoe")
    with pytest.raises(ValueError, match=r"runs/tiny/sparsegpt holds a run with other settings .*trainer.max_steps"):
        de.ensure_run("tiny", "sparsegpt")


def test_a_matched_baseline_resumes_with_the_fraction_it_was_prepared_for(write_scale, monkeypatch):
    """An interrupted baseline matched to DSMoE is relaunched with the fraction in its run directory (DSMoE's cached
    evaluation may since have changed); a run matched to a fixed fraction is not reused as a DSMoE-matched one."""
    import dsmoe.experiment as de
    from dsmoe.train import load_config, train

    scale_dir = write_scale(["dsmoe", "sparsegpt"])
    monkeypatch.setattr(de, "launch_training", lambda config_file: train(load_config(config_file)))
    de.ensure_run("tiny", "sparsegpt")
    run = scale_dir / "runs" / "tiny" / "sparsegpt"
    prepared_for = load_config(run / "launch.yaml").method_options.match_activated
    assert isinstance(prepared_for, float) and load_config(run / "config.yaml").match_activated_from == "dsmoe"
    (run / "train_summary.json").unlink()  # as if it had been stopped: ensure_run launches it again
    relaunched = []
    monkeypatch.setattr(de, "launch_training", lambda config_file: relaunched.append(load_config(config_file)))
    monkeypatch.setattr(de, "evaluate", lambda *a, **k: pytest.fail("a started run is not matched again"))
    with pytest.raises(de.TrainingFailed):  # the stand-in launcher trains nothing
        de.ensure_run("tiny", "sparsegpt")
    assert relaunched[0].method_options.match_activated == prepared_for
    path = scale_dir / "scales" / "tiny.yaml"
    scale = yaml.safe_load(path.read_text())
    scale["methods"]["sparsegpt"]["method_options"]["match_activated"] = 0.5
    path.write_text(yaml.safe_dump(scale))
    with pytest.raises(ValueError, match=r"match_activated_from: 'dsmoe' \(run\) vs None \(now\)"):
        de.ensure_run("tiny", "sparsegpt")


def test_a_damaged_cached_result_is_computed_again_and_other_damaged_json_is_named(tmp_path, capsys):
    from dsmoe.experiment import stored_result
    from dsmoe.packages import read_json

    # truncated; not a result; settings that are not a mapping; settings only
    for damaged in ('{"ppl": 1', "[1, 2]", '{"ppl": 1, "evaluated_with": 5}', '{"evaluated_with": {"limit": 1}}'):
        (tmp_path / "eval.json").write_text(damaged)
        assert stored_result(tmp_path / "eval.json", {"limit": 1}) is None
        assert f"[experiment] {tmp_path / 'eval.json'} " in capsys.readouterr().err
    (tmp_path / "train_summary.json").write_text('{"tokens": 5')
    with pytest.raises(ValueError, match=r"train_summary.json is not valid JSON \(.*\); delete it"):
        read_json(tmp_path / "train_summary.json")


def test_model_fingerprint_changes_when_a_model_is_written_again(tmp_path):
    from dsmoe.experiment import model_fingerprint

    (tmp_path / "model.safetensors").write_bytes(b"1234")
    before = model_fingerprint(str(tmp_path))
    assert model_fingerprint(str(tmp_path)) == before
    (tmp_path / "model.safetensors").write_bytes(b"12345")
    assert model_fingerprint(str(tmp_path)) != before
    assert model_fingerprint("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_ddp_table1_and_tau_sweep_drivers_with_two_processes_per_run(write_scale):
    """The real entry points: the driver launches each run as `python -m dsmoe.train` (Lightning then starts the
    second rank), evaluates alone and writes each CSV once; a re-run trains nothing."""
    import subprocess
    import sys

    scale_dir = write_scale(["dsmoe", "sparsegpt"])
    path = scale_dir / "scales" / "tiny.yaml"
    scale = yaml.safe_load(path.read_text())
    scale["base"]["trainer"].update(devices=2, strategy="ddp", max_steps=2, val_check_interval=2)
    path.write_text(yaml.safe_dump(scale))
    env = {**os.environ, "PYTHONPATH": str(EXPERIMENTS.parent)}

    def run(script):
        proc = subprocess.run(
            [sys.executable, str(EXPERIMENTS / script), "--scale", "tiny"], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
        return proc

    first = run("table1.py")
    assert first.stdout.count("wrote ") == 1 and first.stderr.count("-m dsmoe.train --config") == 2
    rows = read_csv(scale_dir / "results" / "tiny" / "table1_ppl.csv")
    assert [r["Model"] for r in rows] == ["dense (no training)", "SparseGPT", "DSMoE"]
    for run_name in ("dsmoe", "sparsegpt"):
        summary = yaml.safe_load((scale_dir / "runs" / "tiny" / run_name / "train_summary.json").read_text())
        assert summary["world_size"] == 2 and summary["global_step"] == 2
    again = run("table1.py")
    assert "-m dsmoe.train" not in again.stderr and again.stdout.count("finished run found") >= 2
    assert "computing it again" not in again.stderr  # the cached evaluations are reused
    taus = run("tau_sweep.py")
    assert taus.stdout.count("wrote ") == 1 and "-m dsmoe.train" not in taus.stderr
    assert len(read_csv(scale_dir / "results" / "tiny" / "table4_tau.csv")) == 7


@pytest.mark.slow
def test_fsdp_table1_driver_trains_every_method_with_two_processes(write_scale):
    """Table 1 with every method trained under FSDP (2 CPU processes, dsmoe's FSDP strategy): pruned shapes,
    top-k experts and SparseGPT masks on shards, each run exported once and evaluated by the driver."""
    import subprocess
    import sys

    scale_dir = write_scale(["dsmoe", "llama_moe", "sparsegpt", "llm_pruner_block"])
    path = scale_dir / "scales" / "tiny.yaml"
    scale = yaml.safe_load(path.read_text())
    scale["base"]["trainer"].update(devices=2, strategy="fsdp", precision="32-true", max_steps=2, val_check_interval=2)
    scale["methods"]["llm_pruner_channel"] = {
        "method": "llm_pruner_channel",
        "method_options": {"target_fraction": 0.8},
    }
    path.write_text(yaml.safe_dump(scale))
    env = {**os.environ, "PYTHONPATH": str(EXPERIMENTS.parent)}
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "table1.py"), "--scale", "tiny"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert proc.stdout.count("wrote ") == 1 and proc.stderr.count("-m dsmoe.train --config") == 5
    rows = read_csv(scale_dir / "results" / "tiny" / "table1_ppl.csv")
    assert len(rows) == 6 and all(float(r["PPL"]) > 1 for r in rows)
    for run in ("dsmoe", "llama_moe", "sparsegpt", "llm_pruner_block", "llm_pruner_channel"):
        summary = yaml.safe_load((scale_dir / "runs" / "tiny" / run / "train_summary.json").read_text())
        assert summary["world_size"] == 2 and summary["global_step"] == 2, run


@pytest.mark.slow
def test_table1_driver_with_torchrun_as_the_launcher(write_scale):
    """DSMOE_LAUNCHER=torchrun: the driver's runs start as torchrun's ranks (not Lightning's), the CSV is written
    once by the driver."""
    import subprocess
    import sys

    scale_dir = write_scale(["dsmoe", "sparsegpt"])
    path = scale_dir / "scales" / "tiny.yaml"
    scale = yaml.safe_load(path.read_text())
    scale["base"]["trainer"].update(devices=2, strategy="ddp", max_steps=2, val_check_interval=2)
    path.write_text(yaml.safe_dump(scale))
    torchrun = f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node=2 --no-python"
    env = {**os.environ, "PYTHONPATH": str(EXPERIMENTS.parent), "DSMOE_LAUNCHER": torchrun}
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "table1.py"), "--scale", "tiny"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert proc.stdout.count("wrote ") == 1 and proc.stderr.count("torch.distributed.run --standalone") == 2
    for run_name in ("dsmoe", "sparsegpt"):
        summary = yaml.safe_load((scale_dir / "runs" / "tiny" / run_name / "train_summary.json").read_text())
        assert summary["world_size"] == 2 and summary["global_step"] == 2


@pytest.mark.slow
def test_gpu_check_script_runs_its_checks_on_the_cpu(tmp_path, monkeypatch):
    """experiments/gpu_check.py --cpu-smoke: the GPU check's code paths with a tiny model (FSDP on one CPU process)."""
    import importlib

    monkeypatch.setenv("DSMOE_RUNS", str(tmp_path))
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    gpu_check = importlib.reload(importlib.import_module("gpu_check"))
    stale = tmp_path / "gpu_check" / "bf16"  # a finished run of an earlier check: trained again, not reused
    (stale / "final").mkdir(parents=True)
    (stale / "final" / "config.json").write_text("{}")
    (stale / "train_summary.json").write_text('{"global_step": 999, "tokens": 0, "precision": "32-true"}')
    rows = gpu_check.main(["--cpu-smoke"])
    assert rows[0]["value"] == 4
    written = read_csv(tmp_path / "gpu_check" / "smoke_results" / "gpu_check.csv")
    assert [r["check"] for r in written] == [r["check"] for r in rows]  # rewritten after every check
    status = {r["check"]: r["status"] for r in rows}
    assert status == {
        "train DSMoE 4 steps": "ok",
        "FSDP on one device (sharded checkpoints, gathered export)": "ok",
        "baselines calibrated on the accelerator": "ok",
        "LLM-Pruner gradients summed in host memory": "ok",
        "export reloaded anywhere": "ok",
        "PPL on the accelerator": "ok",
        "lm-eval on the accelerator": "ok",
    }, rows
    assert float(next(r["value"] for r in rows if r["check"] == "export reloaded anywhere")) < 1e-4


def test_results_go_where_dsmoe_results_says(tmp_path, monkeypatch):
    """$DSMOE_RESULTS moves every output under results/: the tables' folders, gpu-check's and the inference
    benchmark's CSV (which used to overwrite the checkout's committed one)."""
    from dsmoe.experiment import results_dir

    monkeypatch.setenv("DSMOE_RESULTS", str(tmp_path))
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    assert results_dir("demo") == tmp_path / "demo"
    assert importlib.reload(importlib.import_module("gpu_check")).OUT == tmp_path / "gpu_check"
    bench = importlib.import_module("bench_inference")
    assert bench.parse_args([]).out == tmp_path / "bench_inference.csv"
    assert bench.parse_args(["--out", "x.csv"]).out.name == "x.csv"


def test_documents_protocol_evaluates_each_held_out_document(tiny_scale, assets):
    from dsmoe.data import DataConfig, PretrainDataModule
    from dsmoe.experiment import validation_windows
    from dsmoe.models import load_tokenizer

    path = tiny_scale / "scales" / "tiny.yaml"
    scale = yaml.safe_load(path.read_text())
    scale["eval"]["protocol"] = "documents"
    path.write_text(yaml.safe_dump(scale))
    tok = load_tokenizer(str(assets / "model"))
    sequences = validation_windows("tiny", tok)
    data = PretrainDataModule(DataConfig.from_dict(scale["base"]["data"]), tok)
    data.prepare_data()
    data.setup("validate")
    for name, docs in zip(data.val_source_names, data.val_documents, strict=True):
        expected = [tok(d, add_special_tokens=False).input_ids[:33] for d in docs]  # seq_len 32 + 1, no BOS here
        assert [s.tolist() for s in sequences[name]] == expected
    scale["eval"]["protocol"] = "packed"
    path.write_text(yaml.safe_dump(scale))
    with pytest.raises(
        ValueError, match=r"scale 'tiny' eval.protocol is 'packed'; choose one of \['windows', 'documents'\]"
    ):
        validation_windows("tiny", tok)


def test_a_scales_hub_sources_are_pinned_once_for_all_its_runs(tmp_path, monkeypatch):
    """The first use records the hub's commit; later runs and evaluations read that one although the hub moved on."""
    import json

    import dsmoe.data.sources
    from dsmoe.experiment import pinned_sources

    monkeypatch.setenv("DSMOE_RUNS", str(tmp_path))
    commits = iter(["a" * 40, "b" * 40])
    monkeypatch.setattr(dsmoe.data.sources, "hub_commit", lambda source: next(commits))
    given = ["paper:fineweb-edu", {"preset": "paper:cosmopedia", "revision": "v2"}, "embedded:math"]
    first = pinned_sources("demo", given)
    assert first == [{"preset": "paper:fineweb-edu", "revision": "a" * 40}, given[1], given[2]]
    assert json.loads((tmp_path / "demo" / "data_revisions.json").read_text()) == {"fineweb-edu": "a" * 40}
    assert pinned_sources("demo", given) == first  # not resolved again: the hub's "b" commit is never read


FAKE_TARGET = """
import os, sys, time
from pathlib import Path
log = Path(os.environ["FAKE_LOG"])
log.write_text(log.read_text() + f"{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}\\n")
if Path(sys.argv[0]).name == os.environ.get("FAKE_FAILS"):
    sys.exit(3)
if Path(sys.argv[0]).name == os.environ.get("FAKE_WAITS"):
    Path(os.environ["FAKE_LOG"] + ".waiting").write_text("")
    time.sleep(60)  # until the SIGTERM passed on (its default action: exit by the signal)
"""


def test_all_runs_every_target_and_passes_sigterm_on(tmp_path, monkeypatch):
    """experiments/all.py (./reproduce.sh all): each target's script in turn with the same arguments, each in a child
    process; the first failure stops it with that exit status; a SIGTERM to it (a batch job's time-limit signal) is
    passed on to the target running and it exits 143. reproduce.sh's map is dsmoe.targets.TARGET_SCRIPTS."""
    import signal
    import threading
    import time

    from dsmoe.targets import ALL, TARGET_SCRIPTS

    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    everything = importlib.import_module("all")
    for script in TARGET_SCRIPTS.values():
        (tmp_path / script).write_text(FAKE_TARGET)
    monkeypatch.setattr(everything, "HERE", tmp_path)
    log = tmp_path / "log"
    log.write_text("")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("DSMOE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("DSMOE_RESULTS", str(tmp_path / "results"))
    everything.main(["--scale", "smollm2", "--seeds", "2"])
    assert log.read_text().splitlines() == [f"{TARGET_SCRIPTS[t]} --scale smollm2 --seeds 2" for t in ALL]
    with pytest.raises(ValueError, match="unknown scale 'tiny'"):  # named once, before any target runs
        everything.main(["--scale", "tiny"])
    assert len(log.read_text().splitlines()) == len(ALL)
    log.write_text("")
    monkeypatch.setenv("FAKE_FAILS", "table2.py")
    with pytest.raises(SystemExit) as stopped:
        everything.main([])
    assert stopped.value.code == 3 and log.read_text().split() == ["table1.py", "table2.py"]
    log.write_text("")
    monkeypatch.setenv("FAKE_WAITS", "table1.py")

    def preempt() -> None:
        while not (tmp_path / "log.waiting").exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        everything.main([])
    assert stopped.value.code == 143 and log.read_text().split() == ["table1.py"]
    assert signal.getsignal(signal.SIGTERM) is previous
    text = (EXPERIMENTS.parent / "reproduce.sh").read_text()
    pairs = re.findall(r"\[(\w+)\]=(\w+\.py)", text[text.index("declare -A SCRIPTS") :])
    assert dict(pairs) == TARGET_SCRIPTS
