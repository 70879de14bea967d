"""Inference speed of DSMoE vs the dense model it was converted from, measured side by side in one run.

Rows: FFN level (SmolLM2's 30 FFNs d=576/D=1536 and one LLaMA-7B-shaped FFN d=4096/D=11008, n=8) and
end-to-end (the embedded SmolLM2-135M, 30 layers, or --model), batch-1 decode and prefill, at 2, 3, 4, 5 and 8
of 8 experts active; plus a training-step overhead row (dsmoe variant, LM + sparsity loss, eq. 19).

Activation is forced for control (the controls and timing helpers: dsmoe/bench_inference.py): every router
is replaced by ``ForcedRouter`` (zero weights, so it costs what the real router costs, plus a per-position
logit of ±8, the GEMV's bias in decode), which makes exactly k experts active per token: a random k-subset
per token (prefill) or per layer (end-to-end decode), and the evenly spread, most fragmented subset for the
FFN-level decode. Ideal speedup: 1/active fraction at the FFN level; end-to-end 1/(1 − s + s·k/n) with s the
FFN share of the dense model's measured time (the dense model timed again with its FFNs replaced by zeros).
Timings: torch.utils.benchmark blocked_autorange, interleaved over rounds, median of all blocks.

Layout control (variant ``dense_vt``): DSMoE's expert blocks read down_proj as a contiguous Vᵀ, which
MKL's batch-1 GEMV may stream faster than nn.Linear's V. The dense model with only that change is timed
in the same run, so its row shows how much of a speedup is layout rather than sparsity.

Memory settings, the same for both models and recorded per row: glibc malloc keeps freed memory
(``malloc``), and large tensors sit in transparent huge pages (``huge_pages``, PyTorch's
THP_MEM_ALLOC_ENABLE=1 unless the environment sets it). Provenance per row (dsmoe.results.provenance): model,
method, τ, seed, timing protocol, hardware, git commit and date, with device, torch and quick; tokens and steps
stay blank, as no model here is trained.

    python experiments/bench_inference.py [--threads 1,2] [--quick] [--device cuda] [--model DIR] [--out CSV]
      → results/bench_inference.csv, results/bench_inference.png (the CSV's name with .png)
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

# Huge pages for large CPU tensors (PyTorch reads this once, at its first allocation): both models' weights
# then sit in 2 MB pages; see dsmoe.bench_inference.huge_pages. A user's own `THP_MEM_ALLOC_ENABLE=0` is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from transformers import DynamicCache, LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaMLP  # noqa: E402

from dsmoe import DSMoEConfig, DSMoEMLP, convert, dsmoe_layers, sparsity_loss  # noqa: E402
from dsmoe.bench_inference import (  # noqa: E402
    TIMING_PROTOCOL,
    Case,
    DenseVtFFN,
    ZeroFFN,
    ffn_share,
    force_routers,
    huge_pages,
    keep_freed_memory,
    measure,
    random_pattern,
    speedup_rows,
    spread_pattern,
    timing,
)
from dsmoe.cli import run as run_cli  # noqa: E402
from dsmoe.hf_remote.partitioned_swiglu import swiglu_parts  # noqa: E402
from dsmoe.models import EMBEDDED, load_model  # noqa: E402
from dsmoe.plots import inference_speedup  # noqa: E402
from dsmoe.results import PROVENANCE, provenance, results_root, write_csv  # noqa: E402

N_EXPERTS = 8
ACTIVE = (2, 3, 4, 5, 8)
SHAPES = {"smollm2-ffn": (576, 1536, 30), "llama7b-ffn": (4096, 11008, 1)}  # d, D, layers timed together
TRAIN_STEP_GOAL = 1.05  # DSMoE's training step at most this many times the dense one
COLUMNS = [
    "scope", "model", "shape", "mode", "variant", "batch", "seq", "context", "active_experts", "num_experts",
    "activation", "pattern", "threads", "dense_ms", "dsmoe_ms", "speedup", "speedup_min", "ideal_speedup",
    "frac_of_ideal", "ideal_basis", "ffn_share", "malloc", "huge_pages", "device", "hardware", "torch", "git_commit", "date", "quick",
]  # fmt: skip
FIELDS = COLUMNS + [c for c in PROVENANCE if c not in COLUMNS]


def bench_ffn(name: str, mode: str, tokens: int, threads: int, args: argparse.Namespace) -> list[dict]:
    """FFN layers alone, the same input through each: SmolLM2's 30 layers (so the weights stream from memory
    as in the model, not from cache), one LLaMA-7B layer."""
    d, D, num_layers = SHAPES[name]
    torch.manual_seed(args.seed)
    config = LlamaConfig(hidden_size=d, intermediate_size=D, hidden_act="silu")
    dense = [LlamaMLP(config).to(args.device).eval() for _ in range(num_layers)]
    moe = [DSMoEMLP(swiglu_parts(m), DSMoEConfig(N_EXPERTS)).eval() for m in dense]
    routers = force_routers(moe, tokens)
    x = torch.randn(1, tokens, d, device=args.device)
    gen = torch.Generator().manual_seed(args.seed)
    if mode == "decode":
        patterns = {k: spread_pattern(1, k, N_EXPERTS) for k in ACTIVE}
    else:
        patterns = {k: random_pattern(tokens, k, N_EXPERTS, gen) for k in ACTIVE}

    def run(layers):
        for layer in layers:
            layer(x)

    def force(k):
        for router in routers:
            router.set_pattern(patterns[k])

    dense_vt = [DenseVtFFN(m) for m in dense]
    cases: dict[str, Case] = {
        "dense": (lambda: None, lambda: run(dense)),
        "dense_vt": (lambda: None, lambda: run(dense_vt)),
    }
    cases.update({f"k={k}": (lambda k=k: force(k), lambda: run(moe)) for k in ACTIVE})
    with torch.inference_mode():
        times = measure(cases, threads, args.block_time, args.rounds)
    common = dict(scope="ffn", model=name, shape=f"d={d},D={D},L={num_layers}", mode=mode, batch=1, seq=tokens)
    common.update(context=0, pattern="spread" if mode == "decode" else "random/token", threads=threads)
    return speedup_rows(times, common, ACTIVE, N_EXPERTS, share=None)


@torch.inference_mode()
def bench_e2e(dense, moe, mode: str, threads: int, args: argparse.Namespace) -> list[dict]:
    """Batch-1 decode step at a given KV-cache context, or a prefill with logits of the last token only."""
    vocab, layers = dense.config.vocab_size, dense.model.layers
    gen = torch.Generator().manual_seed(args.seed + 1)
    ctx = args.context
    if mode == "decode":
        prompt = torch.randint(0, vocab, (1, ctx), generator=gen).to(args.device)
        token = torch.randint(0, vocab, (1, 1), generator=gen).to(args.device)
        caches = {}

        def stepper(model):
            caches[id(model)] = DynamicCache(config=model.config)
            model(prompt, past_key_values=caches[id(model)], use_cache=True)

            def step():
                model(token, past_key_values=caches[id(model)], use_cache=True)
                caches[id(model)].crop(-1)  # back to the prompt

            return step

        run_dense, run_moe, tokens = stepper(dense), stepper(moe), 1
    else:
        ids = torch.randint(0, vocab, (1, args.seq), generator=gen).to(args.device)
        run_dense = lambda: dense(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
        run_moe = lambda: moe(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
        tokens = args.seq
    mlps = [layer.mlp for layer in layers]
    dense_vt = [DenseVtFFN(m) for m in mlps]

    def set_ffn(modules):
        for layer, mlp in zip(layers, modules, strict=True):
            layer.mlp = mlp

    routers = [layer.router for layer in dsmoe_layers(moe)]
    patterns = {k: [random_pattern(tokens, k, N_EXPERTS, gen) for _ in routers] for k in ACTIVE}

    def force(k):
        for router, pattern in zip(routers, patterns[k], strict=True):
            router.set_pattern(pattern)

    cases: dict[str, Case] = {
        "dense": (lambda: set_ffn(mlps), run_dense),
        "no_ffn": (lambda: set_ffn([ZeroFFN() for _ in layers]), run_dense),
        "dense_vt": (lambda: set_ffn(dense_vt), run_dense),
    }
    cases.update({f"k={k}": (lambda k=k: force(k), run_moe) for k in ACTIVE})
    times = measure(cases, threads, args.block_time, args.rounds * (2 if tokens > 1 else 1))  # prefill: ~1 per block
    set_ffn(mlps)
    common = dict(scope="e2e", model=args.model_name, shape=model_shape(dense), mode=mode, batch=1)
    common.update(seq=tokens, context=ctx if mode == "decode" else 0, threads=threads)
    common.update(pattern="random/layer" if mode == "decode" else "random/token/layer")
    return speedup_rows(times, common, ACTIVE, N_EXPERTS, share=ffn_share(times["dense"], times["no_ffn"]))


def model_shape(model) -> str:
    c = model.config
    return f"d={c.hidden_size},D={c.intermediate_size},L={c.num_hidden_layers}"


def bench_train(dense, threads: int, args: argparse.Namespace) -> list[dict]:
    """One optimisation-free training step: forward, LM loss (+ sparsity loss for DSMoE), backward."""
    dense = copy.deepcopy(dense).train()
    moe = convert(copy.deepcopy(dense), DSMoEConfig(N_EXPERTS, variant="dsmoe")).train()
    gen = torch.Generator().manual_seed(args.seed + 2)
    ids = torch.randint(0, dense.config.vocab_size, (1, args.train_seq), generator=gen).to(args.device)

    def step(model, with_sparsity):
        def run():
            model.zero_grad(set_to_none=True)
            loss = model(ids, labels=ids, use_cache=False).loss
            if with_sparsity:
                loss = loss + sparsity_loss(model)
            loss.backward()

        return run

    cases = {"dense": (lambda: None, step(dense, False)), "dsmoe": (lambda: None, step(moe, True))}
    times = measure(cases, threads, args.block_time, 2 * args.rounds)  # ~1 s steps: one sample per block
    return [
        dict(
            scope="train",
            model=args.model_name,
            shape=model_shape(dense),
            mode="train_step",
            variant="dsmoe",
            batch=1,
            seq=args.train_seq,
            context=0,
            active_experts="",
            num_experts=N_EXPERTS,
            activation="",
            pattern="learned router (init)",
            threads=threads,
            **timing(times["dense"], times["dsmoe"]),
            ideal_speedup=1 / TRAIN_STEP_GOAL,
            frac_of_ideal="",
            ideal_basis=f"goal: dsmoe/dense step time <= {TRAIN_STEP_GOAL}",
        )
    ]


def speedup_panels(rows: list[dict]) -> dict[str, dict[str, list[tuple[float, float, float]]]]:
    """For dsmoe.plots.inference_speedup: per scope (ffn, e2e), per model/mode/threads, the DSMoE rows'
    (activation, speedup, ideal speedup)."""
    panels: dict[str, dict[str, list[tuple[float, float, float]]]] = {"ffn": {}, "e2e": {}}
    for r in rows:
        if r["scope"] in panels and r["variant"] == "dsmoe":
            label = f"{r['model']} {r['mode']} {r['threads']}t"
            panels[r["scope"]].setdefault(label, []).append((r["activation"], r["speedup"], r["ideal_speedup"]))
    return panels


def print_table(rows: list[dict]) -> None:
    cols = ["scope", "model", "mode", "variant", "seq", "threads", "activation", "dense_ms", "dsmoe_ms", "speedup"]
    cols += ["speedup_min", "ideal_speedup", "frac_of_ideal"]
    print(" ".join(f"{c:>13}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>13.4g}" if isinstance(r[c], float) else f"{r[c]!s:>13}" for c in cols))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2", help="comma list; decode rows run at each, prefill/train at the max")
    p.add_argument("--quick", action="store_true", help="shorter sequences, one round of short timing blocks")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--parts", default="ffn,e2e,train", help="comma list of the parts to run: ffn, e2e, train")
    p.add_argument(
        "--out", type=Path, default=None, help="the CSV; the PNG beside it (default: results/bench_inference.csv)"
    )
    p.add_argument("--seed", type=int, default=0, help="FFN weights and activity patterns (e2e: +1, train: +2)")
    p.add_argument("--model", default=None, help="e2e/train rows: a dense model (default: the embedded SmolLM2-135M)")
    args = p.parse_args(argv)
    args.out = args.out or results_root() / "bench_inference.csv"  # $DSMOE_RESULTS moves results/
    try:
        args.threads = sorted({int(t) for t in args.threads.split(",")})
    except ValueError:
        p.error(f"--threads must be a comma list of positive integers, got {args.threads!r}")
    if args.threads[0] < 1:
        p.error(f"--threads must be positive, got {args.threads}")
    args.parts = set(args.parts.split(","))
    if not args.parts or args.parts - {"ffn", "e2e", "train"}:
        p.error(f"--parts must be a comma list of ffn, e2e, train; got {sorted(args.parts)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    args.seq, args.context, args.train_seq = (128, 16, 32) if args.quick else (512, 64, 128)
    args.block_time, args.rounds = (0.1, 1) if args.quick else (0.5, 5)
    args.model_name = args.model or "smollm2-135m"
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    top = max(args.threads)
    tau = DSMoEConfig(N_EXPERTS).tau
    run_info = provenance(method="dsmoe vs dense", tau=tau, seed=args.seed, protocol=TIMING_PROTOCOL)
    run_info.update(device=args.device, torch=torch.__version__, quick=args.quick)
    run_info["malloc"] = keep_freed_memory()

    rows: list[dict] = []

    def save() -> None:  # after every part: a run cut off (e.g. by a device's time limit) keeps the parts it finished
        write_csv(args.out, [{**run_info, **row} for row in rows], FIELDS)  # the row's own model over provenance's

    if "ffn" in args.parts:
        for name in SHAPES:
            for threads in args.threads:
                rows += bench_ffn(name, "decode", 1, threads, args)
            rows += bench_ffn(name, "prefill", args.seq, top, args)
        save()
    if args.parts & {"e2e", "train"}:
        dense = load_model(args.model or EMBEDDED)[0].to(args.device).eval()
        run_info["huge_pages"] = huge_pages()  # while the dense model is alive
    if "e2e" in args.parts:
        moe = convert(copy.deepcopy(dense), DSMoEConfig(N_EXPERTS)).eval()
        force_routers(dsmoe_layers(moe), max(args.seq, args.context))
        for threads in args.threads:
            rows += bench_e2e(dense, moe, "decode", threads, args)
        rows += bench_e2e(dense, moe, "prefill", top, args)
        del moe
        save()
    if "train" in args.parts:
        rows += bench_train(dense, top, args)
    run_info.setdefault("huge_pages", huge_pages())
    save()
    rows = [{**run_info, **row} for row in rows]
    caption = f"DSMoE vs dense, forced k of {N_EXPERTS} experts active; {run_info['hardware']}"
    png = inference_speedup(speedup_panels(rows), caption, args.out.with_suffix(".png"))
    print_table(rows)
    print(f"wrote {args.out} and {png}")
    return rows


if __name__ == "__main__":
    run_cli(main)
