"""Fixtures shared by the test modules: a tiny Llama with a patterned local corpus, and scales written for it."""

import json
import random
from pathlib import Path

import pytest
import yaml
from tiny_models import tiny_model, word_tokenizer

WORDS = [f"w{i}" for i in range(200)]
EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer, and a patterned local corpus (two sources)."""
    root = tmp_path_factory.mktemp("assets")
    tok = word_tokenizer(WORDS)
    model = tiny_model("llama", vocab_size=256)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    for name, stride in (("a", 1), ("b", 3)):
        docs = []
        for _ in range(120):  # arithmetic word sequences: learnable in a few steps
            start = rng.randrange(150)
            docs.append(" ".join(WORDS[(start + stride * k) % 200] for k in range(rng.randrange(20, 60))))
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root


@pytest.fixture
def write_scale(tmp_path, assets, monkeypatch):
    """``write_scale(methods)`` writes the scale 'tiny' (the assets' model and corpus) with those method runs to
    tmp_path/scales/tiny.yaml, points DSMOE_SCALES_DIR, DSMOE_RUNS and DSMOE_RESULTS into tmp_path, puts
    experiments/ on sys.path, and returns tmp_path."""

    def write(methods):
        data = {
            "sources": [
                {"name": "a", "data_files": str(assets / "a.jsonl")},
                {"name": "b", "data_files": str(assets / "b.jsonl")},
            ],
            "seq_len": 32,
            "val_docs_per_source": 8,
            "shuffle_buffer": 16,
        }
        dsmoe_opts = {"num_experts": 4, "tau": 0.5, "sparsity_weight": 1.0}
        scale = {
            "base": {
                "model": str(assets / "model"),
                "data": data,
                "calibration_sequences": 4,
                "optim": {"lr": 3e-3, "schedule": "constant"},
                "trainer": {
                    "accelerator": "cpu",
                    "global_batch_size": 4,
                    "micro_batch_size": 2,
                    "max_steps": 4,
                    "val_check_interval": 4,
                    "limit_val_batches": 1,
                    "checkpoint_every_n_steps": 2,
                },
            },
            "methods": {
                "dsmoe": {
                    "method": "dsmoe",
                    "method_options": {**dsmoe_opts, "variant": "dsmoe"},
                    "trainer": {"export_tokens": [100, 256]},  # crossed at steps 1 and 2 (128 tokens per step)
                },
                "dsmoe_no_ste": {"method": "dsmoe", "method_options": {**dsmoe_opts, "variant": "no_ste"}},
                "dsmoe_no_gate": {"method": "dsmoe", "method_options": {**dsmoe_opts, "variant": "no_gate"}},
                # 8 experts: a step in k is 5.8% of the tiny model, so the nearest k is within matching's 10%
                "llama_moe": {"method": "llama_moe", "method_options": {"num_experts": 8, "match_activated": "dsmoe"}},
                "sparsegpt": {"method": "sparsegpt", "method_options": {"match_activated": "dsmoe"}},
                "llm_pruner_block": {
                    "method": "llm_pruner_block",
                    "method_options": {"match_activated": "dsmoe", "keep_first": 0, "keep_last": 0},
                },
            },
            "eval": {"val_windows": 2, "batch_size": 2, "benchmark_limit": 2, "max_gen_toks": 4},
        }
        scale["methods"] = {k: v for k, v in scale["methods"].items() if k in methods}
        (tmp_path / "scales").mkdir()
        (tmp_path / "scales" / "tiny.yaml").write_text(yaml.safe_dump(scale))
        monkeypatch.setenv("DSMOE_SCALES_DIR", str(tmp_path / "scales"))
        monkeypatch.setenv("DSMOE_RUNS", str(tmp_path / "runs"))
        monkeypatch.setenv("DSMOE_RESULTS", str(tmp_path / "results"))
        monkeypatch.syspath_prepend(str(EXPERIMENTS))
        return tmp_path

    return write
