"""GPU check: the suite's GPU paths once, end to end, in at most ~8 minutes on one GPU.

    ./reproduce.sh gpu-check [--model embedded:smollm2-135m] [--steps 300]   → results/gpu_check/

1. DSMoE trained on the model in bf16-mixed on one GPU for --steps steps, through the training entry point in its
   own process (as every experiment does), with a weights-only export half-way;
2. the same with FSDP on one device for a few steps: activation checkpointing, rotated sharded checkpoints and the
   gathered export;
3. SparseGPT and LLM-Pruner (block) calibrated and trained for 2 steps on the GPU; LLM-Pruner's importances from
   gradients summed in host memory (its default on a GPU) against gradients in p.grad, with the peak memory of each;
4. the final model reloaded by the suite and by plain transformers (``trust_remote_code=True``): logits compared;
5. PPL of the dense and the trained model on the GPU (bf16, a replica per GPU, in a spawned child process: the
   experiments' evaluation);
6. 20 items of two lm-eval tasks (PIQA, HellaSwag) on the GPU, from the offline copies;
7. the inference benchmark's GPU rows (``experiments/bench_inference.py --device cuda --quick``).

Every check is one row of results/gpu_check/gpu_check.csv (status, seconds, value, detail, provenance); a failing
check is recorded and the next one runs. ``--model random:smollm2`` uses SmolLM2-135M's shapes with random weights
and a tokenizer trained on the fly, for machines without the embedded model's package (shapes, not weights, decide
the timings). ``--cpu-smoke`` runs checks 1–6 on the CPU with a tiny model (FSDP with gloo, through dsmoe's FSDP
strategy) to test this script, writing runs/gpu_check/smoke_results/ instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import traceback
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dsmoe.cli import run as run_cli
from dsmoe.experiment import ROOT, eval_devices, load_for_eval, measure, on_the_gpus, packed_sequences
from dsmoe.launch import launch_training
from dsmoe.packages import write_json
from dsmoe.results import PROVENANCE, provenance, results_root, write_csv

OUT = results_root() / "gpu_check"
RUNS = Path(os.environ.get("DSMOE_RUNS", ROOT / "runs")) / "gpu_check"
COLUMNS = ["check", "status", "seconds", "value", "detail", *PROVENANCE]


def stdlib_corpus(folder: Path, max_bytes: int) -> Path:
    """Python's standard library as a jsonl corpus: present on every machine, no download."""
    out, size = folder / "stdlib.jsonl", 0
    folder.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            if "test" in path.parts or size > max_bytes:
                continue
            text = path.read_text(errors="ignore")
            if text.strip():
                f.write(json.dumps({"text": text}) + "\n")
                size += len(text)
    return out


def random_model(folder: Path, corpus: Path, tiny: bool) -> Path:
    """SmolLM2-135M's architecture (or a tiny Llama) with random weights and a byte-level BPE trained on the corpus."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").exists():
        return folder
    vocab = 512 if tiny else 49152
    bpe = ByteLevelBPETokenizer()
    texts = (json.loads(line)["text"] for line in corpus.open())
    bpe.train_from_iterator(texts, vocab_size=vocab, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    config = AutoConfig.from_pretrained(ROOT / "dsmoe" / "model_configs" / "smollm2-135m-instruct-q4_1.json")
    if tiny:
        config.update(
            {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
            }
        )
    config.vocab_size, config.eos_token_id, config.bos_token_id = len(tokenizer), tokenizer.eos_token_id, None
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def host_gradients(model: str, device_type: str) -> tuple[str, str]:
    """LLM-Pruner's importances from gradients summed in host memory (the default on a GPU) against gradients
    summed in p.grad: the same bits (or within 1e-5 where the GPU's backward is not deterministic), and the
    peak GPU memory of each."""
    from dsmoe.baselines import llm_pruner
    from dsmoe.models import load_model

    device = torch.device(device_type)
    dense, _ = load_model(model)
    dense = dense.to(device)
    seeded = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, dense.config.vocab_size, (2, 64), generator=seeded) for _ in range(3)]
    found, peaks = {}, {}
    for on_host in (False, True):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with llm_pruner.taylor_gradients(dense, batches, on_host=on_host):
            found[on_host] = [llm_pruner.hidden_importance(dense)]
            found[on_host] += [llm_pruner.ffn_importance(layer) for layer in dense.model.layers]
        peaks[on_host] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    memory = f"peak GPU memory {peaks[False]:.0f} MiB in p.grad, {peaks[True]:.0f} MiB in host memory"
    pairs = list(zip(found[False], found[True], strict=True))
    if all(torch.equal(a, b) for a, b in pairs):
        return "identical", memory
    # the same sums of the same per-batch gradients; a GPU backward with atomic adds may differ in the last bits
    if not all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in pairs):
        raise AssertionError("importances are not finite")
    worst = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in pairs)
    if not worst <= 1e-5:
        raise AssertionError(f"importances from host-summed gradients differ from p.grad's: relative {worst:.1e}")
    return f"rel. diff {worst:.1e}", f"{memory}; not bitwise equal: the two backward passes were not deterministic"


def score_benchmarks(final: str, limit: int) -> dict[str, float]:
    """PIQA and HellaSwag, ``limit`` items each, through lm-eval on the evaluation device (the offline copies)."""
    from dsmoe.benchmarks import run_benchmarks

    m, tokenizer = load_for_eval(final)
    scores = run_benchmarks(m, tokenizer, tasks=["piqa", "hellaswag"], limit=limit, batch_size=8, offline=True)
    return {k: v["value"] for k, v in scores.items()}


def train_config(name: str, model: str, corpus: Path, args, method: dict | None = None, **trainer) -> Path:
    """A training run's launch.yaml, as the experiment drivers write it (``method``: DSMoE's unless given)."""
    seq_len, batch = (32, 4) if args.cpu_smoke else (512, 16)
    cfg = {
        "run_name": name,
        "out_dir": str(RUNS),
        "model": model,
        "method": "dsmoe",
        "method_options": {"num_experts": 8 if not args.cpu_smoke else 4, "tau": 0.5},
        **(method or {}),
        "data": {
            "sources": [{"name": "code", "data_files": str(corpus)}],
            "seq_len": seq_len,
            "val_docs_per_source": 8,
        },
        # a warmup shorter than the run (dsmoe.train refuses one that never ends)
        "optim": {"lr": 1e-4, "warmup_steps": min(10, trainer["max_steps"] - 1), "schedule": "cosine"},
        "trainer": {
            "accelerator": "cpu" if args.cpu_smoke else "gpu",
            "devices": 1,
            "precision": "32-true" if args.cpu_smoke else "bf16-mixed",
            "global_batch_size": batch,
            "micro_batch_size": batch,
            "val_check_interval": 100,
            "limit_val_batches": 2,
            "log_every_n_steps": 10,
            **trainer,
        },
        "resume": "last",
    }
    path = RUNS / name / "launch.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def check(rows: list[dict], name: str, work, out: Path, method: str = "dsmoe") -> object:
    """Run one check; record status, time and its value or error, and write out/gpu_check.csv again (a run cut
    short by a time limit keeps the rows it finished)."""
    start = time.perf_counter()
    try:
        value, detail = work()
        status = "ok"
    except Exception as error:  # a failed check is a result too
        value, detail, status = "", f"{type(error).__name__}: {error}"[:500], "failed"
        traceback.print_exc()
    rows.append(
        {
            "check": name,
            "status": status,
            "seconds": round(time.perf_counter() - start, 1),
            "value": value,
            "detail": detail,
            **provenance(model=ROW_MODEL, method=method),
        }
    )
    print(f"[gpu-check] {name}: {status} ({rows[-1]['seconds']} s) {value} {detail}", flush=True)
    write_csv(out / "gpu_check.csv", rows, COLUMNS)
    return value


ROW_MODEL = ""
BASELINES = {  # the pruners, calibrated where they train (prepare_model): the check runs each for 2 steps
    "sparsegpt": {"method": "sparsegpt", "method_options": {"match_activated": 0.8}},
    "llm_pruner_block": {
        "method": "llm_pruner_block",
        "method_options": {"match_activated": 0.8, "calibration_samples": 10, "calibration_seq_len": 64},
    },
}
TINY_MODEL_OPTIONS = {"llm_pruner_block": {"keep_first": 0, "keep_last": 0}}  # --cpu-smoke's model has 2 layers


def main(argv: list[str] | None = None) -> list[dict]:
    global ROW_MODEL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m", help="a model, or random:smollm2")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of the bf16-mixed DSMoE training")
    parser.add_argument("--cpu-smoke", action="store_true", help="test this script on the CPU with a tiny model")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise ValueError("gpu-check needs a GPU (torch.cuda.is_available() is False); --cpu-smoke tests it on the CPU")
    corpus = stdlib_corpus(RUNS / "data", 2_000_000 if args.cpu_smoke else 20_000_000)
    model = args.model
    if args.cpu_smoke or model.startswith("random:"):
        model = str(random_model(RUNS / ("tiny_model" if args.cpu_smoke else "random_smollm2"), corpus, args.cpu_smoke))
    ROW_MODEL = args.model if not args.cpu_smoke else "tiny random Llama (--cpu-smoke)"
    rows: list[dict] = []
    steps = 4 if args.cpu_smoke else args.steps
    out = OUT if not args.cpu_smoke else RUNS / "smoke_results"
    for name in ("bf16", "fsdp", *BASELINES):  # every check trains afresh (a finished run would be reused, not timed)
        shutil.rmtree(RUNS / name, ignore_errors=True)

    def train(name: str, method: dict | None = None, **trainer) -> tuple[str, str]:
        config = train_config(name, model, corpus, args, method, **trainer)
        launch_training(config)
        summary = json.loads((RUNS / name / "train_summary.json").read_text())
        log = RUNS / name / "tensorboard"
        return summary["global_step"], f"tokens {summary['tokens']}, {summary['precision']}, logs {log}"

    final = RUNS / "bf16" / "final"
    check(
        rows,
        f"train DSMoE {steps} steps",
        lambda: train(
            "bf16",
            max_steps=steps,
            checkpoint_every_n_steps=max(steps // 3, 1),
            export_tokens=[steps // 2 * 16 * 512] if not args.cpu_smoke else [8 * 32],
        ),
        out,
    )

    def fsdp() -> tuple[str, str]:
        steps, detail = train(
            "fsdp",
            strategy="fsdp",
            activation_checkpointing=True,
            max_steps=4 if args.cpu_smoke else 20,
            checkpoint_every_n_steps=2 if args.cpu_smoke else 5,
            keep_checkpoints=True,
        )
        kept = sorted(p.name for p in (RUNS / "fsdp" / "checkpoints").glob("*step=*.ckpt") if p.is_dir())
        import dsmoe

        dsmoe.load(RUNS / "fsdp" / "final")
        return steps, f"{detail}; sharded checkpoints kept: {kept}"

    check(rows, "FSDP on one device (sharded checkpoints, gathered export)", fsdp, out)

    def baselines() -> tuple[str, str]:
        steps = {}
        for name, method in BASELINES.items():
            if args.cpu_smoke:
                options = {**method["method_options"], **TINY_MODEL_OPTIONS.get(name, {})}
                method = {**method, "method_options": options}
            steps[name] = train(name, method=method, max_steps=2)[0]
        return json.dumps(steps), "calibrated (SparseGPT Hessians, LLM-Pruner gradients) on the GPU, 2 steps each"

    check(rows, "baselines calibrated on the accelerator", baselines, out, method=" ".join(BASELINES))

    # like the experiments' evaluations, the GPU work below runs in spawned child processes (on_the_gpus)
    device_type = "cpu" if args.cpu_smoke else "cuda"
    gradients = partial(on_the_gpus, host_gradients, model, device_type)
    check(rows, "LLM-Pruner gradients summed in host memory", gradients, out, method="llm_pruner_block")

    def reload() -> tuple[str, str]:
        import dsmoe

        ours = dsmoe.load(final).eval()
        ids = torch.randint(0, ours.config.vocab_size, (1, 16))
        code = (
            "import sys, torch; from transformers import AutoModelForCausalLM;"
            f"m = AutoModelForCausalLM.from_pretrained({str(final)!r}, trust_remote_code=True).eval();"
            f"ids = torch.tensor({ids.tolist()});"
            "torch.save(m(ids).logits, sys.argv[1]); assert 'dsmoe' not in sys.modules"
        )
        logits_file = RUNS / "remote_logits.pt"
        subprocess.run([sys.executable, "-c", code, str(logits_file)], check=True, cwd="/")
        with torch.no_grad():
            diff = (torch.load(logits_file) - ours(ids).logits).abs().max().item()
        return f"{diff:.2e}", "max |logit difference|, plain transformers (trust_remote_code) vs dsmoe.load"

    check(rows, "export reloaded anywhere", reload, out)

    def ppl() -> tuple[str, str]:
        from dsmoe.data import DataConfig, PretrainDataModule
        from dsmoe.models import load_tokenizer

        data = PretrainDataModule(
            DataConfig.from_dict(OmegaConf.to_container(OmegaConf.load(RUNS / "bf16" / "launch.yaml").data)),
            load_tokenizer(model),
        )
        data.prepare_data()
        data.setup("validate")
        packed = {name: packed_sequences(w) for name, w in zip(data.val_source_names, data.val_windows, strict=True)}
        values = {}
        for label, source in (("dense", model), ("dsmoe", str(final))):
            dense_params = None if label == "dense" else values["dense"]["dense_params"]
            # as the experiments evaluate: in a spawned child process on the GPUs (the driver holds no CUDA context)
            spec = (source, label, packed, 8, None, True, dense_params, {"model": ROW_MODEL, "method": label}, None)
            values[label] = on_the_gpus(measure, *spec)
        ppl = {label: result["ppl"] for label, result in values.items()}
        return json.dumps(ppl), f"on {eval_devices()}, {values['dsmoe']['provenance']['hardware']}"

    check(rows, "PPL on the accelerator", ppl, out)

    def benchmarks() -> tuple[str, str]:
        from dsmoe.benchmarks.data import read_manifest

        manifest = read_manifest()
        if manifest is None or not all(t in manifest["tasks"] for t in ("piqa", "hellaswag")):
            raise FileNotFoundError("no offline benchmark copies: run `python -m dsmoe.benchmarks setup` (needs PyPI)")
        limit = 2 if args.cpu_smoke else 20
        scores = on_the_gpus(score_benchmarks, str(final), limit)
        return json.dumps(scores), f"{limit} items each, lm-eval, offline copies"

    check(rows, "lm-eval on the accelerator", benchmarks, out)
    if not args.cpu_smoke:
        bench_csv = OUT / "bench_inference_gpu.csv"

        def bench() -> tuple[str, str]:
            command = [
                sys.executable,
                str(ROOT / "experiments" / "bench_inference.py"),
                "--device",
                "cuda",
                "--quick",
                "--threads",
                "1",
                "--parts",
                "ffn,e2e",
                "--model",
                model,
                "--out",
                str(bench_csv),
            ]
            subprocess.run(command, check=True)
            return bench_csv.name, "sparse vs dense on the GPU (ratios in the CSV)"

        check(rows, "inference benchmark GPU rows", bench, out)
    write_json(
        out / "environment.json",
        {"torch": torch.__version__, "cuda": torch.version.cuda, "devices": [str(d) for d in eval_devices()]},
    )
    print(f"wrote {out / 'gpu_check.csv'}: {sum(r['status'] == 'ok' for r in rows)} of {len(rows)} checks ok")
    return rows


if __name__ == "__main__":
    run_cli(main)
