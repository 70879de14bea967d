"""The inference benchmark's controls and timing arithmetic (dsmoe.bench_inference), on tiny layers."""

import re

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaMLP

from dsmoe import DSMoEConfig, DSMoEMLP
from dsmoe.bench_inference import (
    DenseVtFFN,
    ZeroFFN,
    ffn_share,
    force_routers,
    huge_pages,
    ideal_speedup,
    measure,
    random_pattern,
    speedup_rows,
    spread_pattern,
    timing,
)
from dsmoe.hf_remote.partitioned_swiglu import SwiGLUParts

D_MODEL, D_FF, N = 32, 64, 8
TOKENS = 16


def tiny_layer() -> DSMoEMLP:
    torch.manual_seed(0)
    gate, up, down = (
        nn.Linear(D_MODEL, D_FF, bias=False),
        nn.Linear(D_MODEL, D_FF, bias=False),
        nn.Linear(D_FF, D_MODEL),
    )
    return DSMoEMLP(SwiGLUParts(gate, up, down, ACT2FN["silu"]), DSMoEConfig(num_experts=N, tau=0.5)).eval()


@pytest.mark.parametrize("k", range(1, N + 1))
def test_forced_router_activates_exactly_the_patterns_experts(k):
    layer = tiny_layer()
    (router,) = force_routers([layer], max_tokens=TOKENS)
    assert layer.router is router and not router.weight.any()
    gen = torch.Generator().manual_seed(k)
    for pattern in (random_pattern(TOKENS, k, N, gen), spread_pattern(TOKENS, k, N)):
        router.set_pattern(pattern)
        with torch.no_grad():
            layer(torch.randn(TOKENS, D_MODEL))
        assert torch.equal(layer.last_active, pattern)
        assert (layer.last_active.sum(-1) == k).all()
        router.set_pattern(pattern[:1])  # decode: the offset goes in as the GEMV's bias
        with torch.no_grad():
            layer(torch.randn(1, D_MODEL))
        assert torch.equal(layer.last_active, pattern[:1])


def test_forced_layers_time_the_sparse_path_on_any_device():
    """The "auto" path off the CPU is the masked one (every expert): the GPU rows would time no sparsity at all."""
    layer = tiny_layer()
    force_routers([layer], max_tokens=TOKENS)
    assert layer.inference_impl == "sparse"


def test_random_pattern_k_per_token_spread_over_all_experts():
    tokens, k = 4000, 3
    pattern = random_pattern(tokens, k, N, torch.Generator().manual_seed(0))
    assert pattern.shape == (tokens, N) and pattern.dtype == torch.bool
    assert (pattern.sum(-1) == k).all()
    per_expert = pattern.float().mean(0)  # each expert in a uniform k-subset with probability k/n
    assert torch.allclose(per_expert, torch.full((N,), k / N), atol=0.03)
    assert len({tuple(row.tolist()) for row in pattern}) == 56  # every one of the C(8, 3) subsets occurs
    again = random_pattern(tokens, k, N, torch.Generator().manual_seed(0))
    assert torch.equal(pattern, again)


@pytest.mark.parametrize(
    ("k", "experts"), [(1, [0]), (2, [0, 4]), (3, [0, 2, 5]), (4, [0, 2, 4, 6]), (5, [0, 1, 3, 4, 6]), (8, range(8))]
)
def test_spread_pattern_same_evenly_spread_experts_for_every_token(k, experts):
    pattern = spread_pattern(5, k, N)
    expected = torch.zeros(N, dtype=torch.bool)
    expected[list(experts)] = True
    assert pattern.shape == (5, N) and (pattern == expected).all()


def test_dense_vt_control_computes_the_dense_ffn():
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=D_MODEL, intermediate_size=D_FF, hidden_act="silu"))
    control = DenseVtFFN(mlp)
    assert control.down_t.is_contiguous() and control.down_t.shape == (D_FF, D_MODEL)
    x = torch.randn(3, 5, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(control(x), mlp(x), rtol=1e-5, atol=1e-6)  # fp32 rounding only
        assert torch.equal(ZeroFFN()(x), torch.zeros_like(x))


def test_ideal_speedup_by_hand():
    assert ideal_speedup(3, 8) == pytest.approx(8 / 3)  # the FFNs alone: 1/activation
    assert ideal_speedup(3, 8, share=0.6) == pytest.approx(1 / 0.625)  # 1/(0.4 + 0.6·3/8)
    assert ideal_speedup(2, 8, share=0.0) == 1.0  # no FFN time, nothing to gain
    assert ideal_speedup(8, 8, share=0.6) == pytest.approx(1.0)  # every expert active


def test_timing_medians_and_fastest_blocks():
    t = timing([0.003, 0.001, 0.002], [0.004, 0.00025, 0.001])
    assert t == pytest.approx(dict(dense_ms=2.0, dsmoe_ms=1.0, speedup=2.0, speedup_min=4.0))
    assert ffn_share([0.008, 0.010, 0.012], [0.004, 0.003, 0.005]) == pytest.approx(0.6)  # 1 − 4/10


def test_speedup_rows_control_and_one_row_per_active_count():
    times = {"dense": [0.010], "dense_vt": [0.008], "k=2": [0.004], "k=4": [0.008]}
    rows = speedup_rows(times, {"scope": "ffn"}, (2, 4), N, share=None)
    control, two, four = rows
    assert control["variant"] == "dense_vt" and control["ideal_speedup"] == 1.0
    assert control["speedup"] == pytest.approx(1.25) and control["frac_of_ideal"] == pytest.approx(1.25)
    assert [r["active_experts"] for r in rows] == [N, 2, 4] and all(r["scope"] == "ffn" for r in rows)
    assert two["activation"] == 0.25 and two["ideal_speedup"] == 4.0 and two["speedup"] == pytest.approx(2.5)
    assert two["frac_of_ideal"] == pytest.approx(2.5 / 4) and two["ideal_basis"] == "1/activation"
    assert four["ideal_speedup"] == 2.0 and "ffn_share" not in four
    e2e = speedup_rows(times, {"scope": "e2e"}, (2, 4), N, share=0.6)
    assert all(r["ffn_share"] == 0.6 for r in e2e)
    assert e2e[1]["ideal_speedup"] == pytest.approx(1 / (0.4 + 0.6 / 4))
    assert e2e[2]["frac_of_ideal"] == pytest.approx(1.25 / (1 / (0.4 + 0.3)))


def test_measure_interleaves_the_cases_in_every_round():
    calls = []
    cases = {name: (lambda n=name: calls.append(f"prepare {n}"), lambda n=name: calls.append(n)) for name in "ab"}
    times = measure(cases, threads=torch.get_num_threads(), block_time=1e-3, rounds=2)
    starts = [i for i, c in enumerate(calls) if c.startswith("prepare")]
    assert [calls[i] for i in starts] == ["prepare a", "prepare b", "prepare a", "prepare b"]
    for start, end in zip(starts, [*starts[1:], len(calls)], strict=True):  # each case runs right after its prepare
        assert set(calls[start + 1 : end]) == {calls[start].removeprefix("prepare ")}
    assert set(times) == {"a", "b"} and all(len(t) >= 2 and min(t) > 0 for t in times.values())


def test_huge_pages_reports_the_setting():
    report = huge_pages()
    assert report == "unknown" or re.fullmatch(r"THP_MEM_ALLOC_ENABLE=\S+: \d+ MB in huge pages", report)


def test_inference_speedup_figure_is_written(tmp_path):
    from dsmoe.plots import inference_speedup

    panels = {"ffn": {"smollm2-ffn decode 1t": [(0.25, 3.2, 4.0), (1.0, 0.98, 1.0)]}, "e2e": {}}
    path = inference_speedup(panels, "DSMoE vs dense", tmp_path / "bench.png")
    assert path == tmp_path / "bench.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_script_times_the_model_it_is_given_and_saves_each_part(tmp_path, assets, monkeypatch):
    """gpu-check passes its model (the device has no embedded one); rows name it and its shape."""
    import csv
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "experiments"))
    import bench_inference as script

    saved = []
    real_write = script.write_csv
    monkeypatch.setattr(
        script, "write_csv", lambda path, rows, fields: (saved.append(len(rows)), real_write(path, rows, fields))
    )
    out = tmp_path / "bench.csv"
    argv = ["--quick", "--threads", "1", "--parts", "e2e,train", "--model", str(assets / "model"), "--out", str(out)]
    script.main(argv)
    rows = list(csv.DictReader(out.open()))
    assert {r["model"] for r in rows} == {str(assets / "model")} and {r["shape"] for r in rows} == {"d=64,D=128,L=2"}
    assert {r["scope"] for r in rows} == {"e2e", "train"}
    assert saved[0] < saved[-1] == len(rows)  # e2e rows written before the train part ran
