"""Inference speed of DSMoE vs the dense model it was converted from, measured side by side in one run.

Rows: FFN level (SmolLM2's 30 FFNs d=576/D=1536 and one LLaMA-7B-shaped FFN d=4096/D=11008, n=8) and
end-to-end (the embedded SmolLM2-135M, 30 layers), batch-1 decode and prefill, at 2, 3, 4, 5 and 8
of 8 experts active; plus a training-step overhead row (dsmoe variant, LM + sparsity loss, eq. 19).

Activation is forced for control: every router is replaced by ``ForcedRouter`` (zero weights, so it
costs what the real router costs, plus a per-position logit of ±8, the GEMV's bias in decode), which
makes exactly k experts active per token: a random k-subset per token (prefill) or per layer (end-to-end
decode), and the evenly spread, most fragmented subset for the FFN-level decode. Ideal speedup: 1/active
fraction at the FFN level; end-to-end 1/(1 − s + s·k/n) with s the FFN share of the dense model's
measured time (the dense model timed again with its FFNs replaced by zeros). Timings:
torch.utils.benchmark blocked_autorange, interleaved over rounds, median of all blocks.

Layout control (variant ``dense_vt``): DSMoE's expert blocks read down_proj as a contiguous Vᵀ, which
MKL's batch-1 GEMV may stream faster than nn.Linear's V. The dense model with only that change is timed
in the same run, so its row shows how much of a speedup is layout rather than sparsity.

Memory settings, the same for both models and recorded per row: glibc malloc keeps freed memory
(``malloc``), and large tensors sit in transparent huge pages (``huge_pages``, PyTorch's
THP_MEM_ALLOC_ENABLE=1 unless the environment sets it).

    python experiments/bench_inference.py [--threads 1,2] [--quick] [--device cuda]
      → results/bench_inference.csv, results/bench_inference.png
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import os
import re
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

# Huge pages for large CPU tensors (PyTorch reads this once, at its first allocation): both models' weights
# then sit in 2 MB pages; see huge_pages(). A user's own `THP_MEM_ALLOC_ENABLE=0` is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.benchmark import Timer  # noqa: E402
from transformers import DynamicCache, LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaMLP  # noqa: E402

from dsmoe import DSMoEConfig, DSMoEMLP, convert, dsmoe_layers, sparsity_loss  # noqa: E402
from dsmoe.cli import run as run_cli
from dsmoe.models import load_model  # noqa: E402
from dsmoe.results import git_commit, hardware, write_csv  # noqa: E402

N_EXPERTS = 8
ACTIVE = (2, 3, 4, 5, 8)
SHAPES = {"smollm2-ffn": (576, 1536, 30), "llama7b-ffn": (4096, 11008, 1)}  # d, D, layers timed together
RESULTS = Path(__file__).resolve().parents[1] / "results"
FIELDS = [
    "scope", "model", "shape", "mode", "variant", "batch", "seq", "context", "active_experts", "num_experts",
    "activation", "pattern", "threads", "dense_ms", "dsmoe_ms", "speedup", "speedup_min", "ideal_speedup",
    "frac_of_ideal", "ideal_basis", "ffn_share", "malloc", "huge_pages", "device", "hardware", "torch", "git_commit", "date", "quick",
]  # fmt: skip
Case = tuple[Callable[[], None], Callable[[], object]]  # (prepare, timed statement)


class ForcedRouter(nn.Module):
    """Zero-weight router plus a per-position logit offset: token t activates exactly the experts of pattern[t]."""

    def __init__(self, hidden_size: int, num_experts: int, max_tokens: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size), requires_grad=False)
        self.register_buffer("offset", torch.zeros(max_tokens, num_experts))

    def set_pattern(self, active: torch.Tensor) -> None:
        self.offset = active.to(self.offset) * 16 - 8  # σ(±8) is far from τ=0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:  # decode: one GEMV with the offset as its bias, as cheap as a router's GEMV
            return nn.functional.linear(x, self.weight, self.offset[0])
        return nn.functional.linear(x, self.weight) + self.offset[: x.shape[0]]


class ZeroFFN(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class DenseVtFFN(nn.Module):
    """Layout control: the dense FFN with down_proj read from a contiguous Vᵀ, the layout of DSMoE's expert blocks.
    Dense vs this isolates the layout's share of a speedup."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.act_fn
        self.down_t = mlp.down_proj.weight.detach().t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.act_fn(self.gate_proj(x)) * self.up_proj(x)) @ self.down_t


def random_pattern(tokens: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """bool [tokens, n] with a uniformly random k-subset of the experts per token."""
    order = torch.rand(tokens, N_EXPERTS, generator=gen).argsort(-1)
    return torch.zeros(tokens, N_EXPERTS, dtype=torch.bool).scatter_(1, order[:, :k], True)


def spread_pattern(tokens: int, k: int) -> torch.Tensor:
    """bool [tokens, n]: experts ⌊i·n/k⌋, i < k, the same for every token (fewest adjacent experts)."""
    active = torch.zeros(tokens, N_EXPERTS, dtype=torch.bool)
    active[:, [i * N_EXPERTS // k for i in range(k)]] = True
    return active


def force_routers(layers: list[DSMoEMLP], max_tokens: int) -> list[ForcedRouter]:
    routers = []
    for layer in layers:
        layer.router = ForcedRouter(layer.gate_proj.in_features, N_EXPERTS, max_tokens).to(layer.gate_proj.weight)
        routers.append(layer.router)
    return routers


def keep_freed_memory() -> str:
    """Tell glibc malloc to keep freed memory: no trimming and no mmap, so every allocation comes from the heap
    and is reused. Otherwise large temporaries are returned to the OS and page-faulted back in on every call
    (measured here: 70-100k minor faults per dense 512-token prefill; 55-83k per training step, from the 113 MB
    embedding gradient and the 25 MB logits, which no mmap threshold can keep), which swamps the comparison.
    Applies to dense and DSMoE alike; PyTorch's CPU tuning guide suggests jemalloc/tcmalloc for the same reason."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default"
    m_trim_threshold, m_mmap_max = -1, -4
    ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    return "glibc: no trim, no mmap" if ok else "default"


def huge_pages() -> str:
    """How much of this process's memory sits in transparent huge pages, with the setting that asked for them.
    Applies to dense and DSMoE alike; it helps DSMoE's decode more, which reads many small expert blocks
    (fewer TLB misses), see results/README.md."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            kb = int(re.search(r"AnonHugePages:\s+(\d+) kB", f.read()).group(1))
    except (OSError, AttributeError):
        return "unknown"
    return f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}: {kb >> 10} MB in huge pages"


def measure(cases: dict[str, Case], threads: int, block_time: float, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each case, one blocked_autorange per case per round, cases interleaved in every round
    so that load from other processes hits them alike. Returns every block's time per call."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    torch.set_num_threads(threads)
    for r in range(rounds):
        for name, (prepare, stmt) in cases.items():
            prepare()
            if r == 0:
                stmt()  # warm-up: weight caches, allocator, lazy init
            timer = Timer("stmt()", globals={"stmt": stmt}, num_threads=threads)
            times[name] += timer.blocked_autorange(min_run_time=block_time).times
    return times


def provenance(device: str, quick: bool) -> dict[str, object]:
    return dict(
        device=device,
        hardware=hardware(),
        torch=torch.__version__,
        git_commit=git_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        quick=quick,
    )


def timing(dense: list[float], dsmoe: list[float]) -> dict[str, float]:
    """Median times and their ratio; speedup_min compares the fastest blocks, the estimate least hurt by load."""
    dense_s, dsmoe_s = statistics.median(dense), statistics.median(dsmoe)
    return dict(
        dense_ms=1e3 * dense_s, dsmoe_ms=1e3 * dsmoe_s, speedup=dense_s / dsmoe_s, speedup_min=min(dense) / min(dsmoe)
    )


def rows_for(times: dict[str, list[float]], common: dict, ideal: Callable[[int], float], basis: str) -> list[dict]:
    """One row per active count, and the layout-control row (dense vs dense with down_proj as Vᵀ)."""
    rows = []
    t = timing(times["dense"], times["dense_vt"])
    control = dict(active_experts=N_EXPERTS, num_experts=N_EXPERTS, activation=1.0, **t, ideal_speedup=1.0)
    control.update(frac_of_ideal=t["speedup"], ideal_basis="no sparsity: the down_proj layout alone")
    control.update(variant="dense_vt", pattern="dense FFN, down_proj as contiguous Vᵀ (layout control)")
    rows.append(dict(common, **control))
    for k in ACTIVE:
        t = timing(times["dense"], times[f"k={k}"])
        rows.append(
            dict(
                common,
                variant="dsmoe",
                active_experts=k,
                num_experts=N_EXPERTS,
                activation=k / N_EXPERTS,
                **t,
                ideal_speedup=ideal(k),
                frac_of_ideal=t["speedup"] / ideal(k),
                ideal_basis=basis,
            )
        )
    return rows


def bench_ffn(name: str, mode: str, tokens: int, threads: int, args, device: str) -> list[dict]:
    """FFN layers alone, the same input through each: SmolLM2's 30 layers (so the weights stream from memory
    as in the model, not from cache), one LLaMA-7B layer."""
    d, D, num_layers = SHAPES[name]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=d, intermediate_size=D, hidden_act="silu")
    dense = [LlamaMLP(config).to(device).eval() for _ in range(num_layers)]
    moe = [DSMoEMLP(m.gate_proj, m.up_proj, m.down_proj, m.act_fn, DSMoEConfig(N_EXPERTS)).eval() for m in dense]
    routers = force_routers(moe, tokens)
    x = torch.randn(1, tokens, d, device=device)
    gen = torch.Generator().manual_seed(0)
    patterns = {k: spread_pattern(1, k) if mode == "decode" else random_pattern(tokens, k, gen) for k in ACTIVE}

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
    return rows_for(times, common, lambda k: N_EXPERTS / k, "1/activation")


@torch.inference_mode()
def bench_e2e(dense, moe, mode: str, threads: int, args, device: str) -> list[dict]:
    """Batch-1 decode step at a given KV-cache context, or a prefill with logits of the last token only."""
    vocab, layers = dense.config.vocab_size, dense.model.layers
    gen = torch.Generator().manual_seed(1)
    ctx = args.context
    if mode == "decode":
        prompt = torch.randint(0, vocab, (1, ctx), generator=gen).to(device)
        token = torch.randint(0, vocab, (1, 1), generator=gen).to(device)
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
        ids = torch.randint(0, vocab, (1, args.seq), generator=gen).to(device)
        run_dense = lambda: dense(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
        run_moe = lambda: moe(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
        tokens = args.seq
    mlps = [layer.mlp for layer in layers]
    dense_vt = [DenseVtFFN(m) for m in mlps]

    def set_ffn(modules):
        for layer, mlp in zip(layers, modules, strict=True):
            layer.mlp = mlp

    routers = [layer.router for layer in dsmoe_layers(moe)]
    patterns = {k: [random_pattern(tokens, k, gen) for _ in routers] for k in ACTIVE}

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
    share = 1 - statistics.median(times["no_ffn"]) / statistics.median(times["dense"])
    common = dict(scope="e2e", model="smollm2-135m", shape=f"d=576,D=1536,L={len(layers)}", mode=mode, batch=1)
    common.update(seq=tokens, context=ctx if mode == "decode" else 0, threads=threads, ffn_share=share)
    common.update(pattern="random/layer" if mode == "decode" else "random/token/layer")
    ideal = lambda k: 1 / (1 - share + share * k / N_EXPERTS)  # noqa: E731
    return rows_for(times, common, ideal, "measured FFN time share s: 1/(1-s+s*a)")


def bench_train(dense, threads: int, args, device: str) -> list[dict]:
    """One optimisation-free training step: forward, LM loss (+ sparsity loss for DSMoE), backward."""
    dense = copy.deepcopy(dense).train()
    moe = convert(copy.deepcopy(dense), DSMoEConfig(N_EXPERTS, variant="dsmoe")).train()
    ids = torch.randint(0, dense.config.vocab_size, (1, args.train_seq), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)

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
    t = timing(times["dense"], times["dsmoe"])
    return [
        dict(
            scope="train",
            model="smollm2-135m",
            shape="d=576,D=1536,L=30",
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
            **t,
            ideal_speedup=1 / 1.05,
            frac_of_ideal="",
            ideal_basis="goal: dsmoe/dense step time <= 1.05",
        )
    ]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, scope in zip(axes, ("ffn", "e2e"), strict=True):
        series: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["scope"] == scope and r["variant"] == "dsmoe":
                series.setdefault((r["model"], r["mode"], r["threads"]), []).append(r)
        for (model, mode, threads), rs in series.items():
            a = [r["activation"] for r in rs]
            (line,) = ax.plot(a, [r["speedup"] for r in rs], "o-", label=f"{model} {mode} {threads}t")
            ax.plot(a, [r["ideal_speedup"] for r in rs], ":", color=line.get_color())
        ax.axhline(1, color="gray", lw=0.8)
        ax.set(xlabel="active fraction k/n", ylabel="speedup over dense", title=f"{scope} (dotted: ideal)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def print_table(rows: list[dict]) -> None:
    cols = ["scope", "model", "mode", "variant", "seq", "threads", "activation", "dense_ms", "dsmoe_ms", "speedup"]
    cols += ["speedup_min", "ideal_speedup", "frac_of_ideal"]
    print(" ".join(f"{c:>13}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>13.4g}" if isinstance(r[c], float) else f"{r[c]!s:>13}" for c in cols))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2", help="comma list; decode rows run at each, prefill/train at the max")
    p.add_argument("--quick", action="store_true", help="shorter sequences, 2 rounds of short timing blocks")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--parts", default="ffn,e2e,train", help="comma list of the parts to run: ffn, e2e, train")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_inference.csv")
    args = p.parse_args(argv)
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
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device, top = args.device, max(args.threads)
    info = provenance(device, args.quick)
    info["malloc"] = keep_freed_memory()
    rows: list[dict] = []
    if "ffn" in args.parts:
        for name in SHAPES:
            for threads in args.threads:
                rows += bench_ffn(name, "decode", 1, threads, args, device)
            rows += bench_ffn(name, "prefill", args.seq, top, args, device)
    if args.parts & {"e2e", "train"}:
        dense = load_model()[0].to(device).eval()
    if "e2e" in args.parts:
        moe = convert(copy.deepcopy(dense), DSMoEConfig(N_EXPERTS)).eval()
        force_routers(dsmoe_layers(moe), max(args.seq, args.context))
        for threads in args.threads:
            rows += bench_e2e(dense, moe, "decode", threads, args, device)
        rows += bench_e2e(dense, moe, "prefill", top, args, device)
        del moe
    if "train" in args.parts:
        rows += bench_train(dense, top, args, device)
    info["huge_pages"] = huge_pages()  # while the dense model is alive
    rows = [{**row, **info} for row in rows]
    write_csv(args.out, rows, FIELDS)
    plot(rows, args.out.with_suffix(".png"))
    print_table(rows)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return rows


if __name__ == "__main__":
    run_cli(main)
