"""The fast eval paths (dsmoe.fast) against the masked dense reference DSMoEMLP.masked_forward."""

import pytest
import torch
from tiny_models import dsmoe_layer, tiny_model
from torch import nn

from dsmoe import DSMoEConfig, activation_stats, convert, dsmoe_layers
from dsmoe.fast import DECODE_MAX_TOKENS, expert_runs, sparse_forward
from dsmoe.stats import count_only

D_MODEL, D_FF, N = 32, 64, 8
TOL = dict(rtol=1e-5, atol=1e-6)


def make_layer(bias=False, seed=0, router_std=0.5):
    return dsmoe_layer(D_MODEL, D_FF, DSMoEConfig(num_experts=N, tau=0.5), seed, router_std, bias).eval()


def pattern_weights(active):
    """Eq. 8 weights for a given activity mask: random gates above τ, times n/#active."""
    gates = 0.5 + 0.5 * torch.rand(active.shape)
    return gates * active * N / active.sum(-1, keepdim=True).clamp(min=1)


def patterns(tokens, seed):
    g = torch.Generator().manual_seed(seed)
    random = torch.rand(tokens, N, generator=g) < 0.4
    holes = random.clone()
    holes[:, [1, 5]] = False  # experts without tokens
    holes[0] = False  # a token without experts
    return {
        "random": random,
        "holes": holes,
        "all": torch.ones(tokens, N, dtype=torch.bool),
        "none": torch.zeros(tokens, N, dtype=torch.bool),
        "one_run": torch.zeros(tokens, N, dtype=torch.bool).index_fill_(1, torch.tensor([2, 3, 4]), True),
    }


# dense_fraction 0: every used expert over all tokens (decode); 0.5: mixed; 1.0: only experts every token
# uses; 2.0: every expert on its gathered tokens (prefill grouping).
FRACTIONS = [None, 0.0, 0.5, 1.0, 2.0]


@pytest.mark.parametrize("dense_fraction", FRACTIONS)
@pytest.mark.parametrize("tokens", [1, 3, 37])
@pytest.mark.parametrize("bias", [False, True])
def test_fast_paths_equal_masked_reference(dense_fraction, tokens, bias):
    layer = make_layer(bias=bias)
    x = torch.randn(tokens, D_MODEL)
    with torch.no_grad():
        for name, active in patterns(tokens, seed=tokens).items():
            weights = pattern_weights(active)
            out = sparse_forward(layer, x, weights, active, dense_fraction)
            torch.testing.assert_close(out, layer.masked_forward(x, weights), **TOL, msg=name)


@pytest.mark.parametrize("dense_fraction", FRACTIONS)
def test_token_without_experts_outputs_exact_zero(dense_fraction):
    layer = make_layer()
    x = torch.randn(6, D_MODEL)
    active = torch.rand(6, N) < 0.5
    active[2] = False
    active[4] = True
    with torch.no_grad():
        out = sparse_forward(layer, x, pattern_weights(active), active, dense_fraction)
    assert torch.equal(out[2], torch.zeros(D_MODEL))
    assert out[4].abs().sum() > 0


@pytest.mark.parametrize(
    "shape", [(1, D_MODEL), (1, 1, D_MODEL), (3, D_MODEL), (2, 1, D_MODEL), (5, D_MODEL), (4, 9, D_MODEL)]
)
def test_layer_eval_sparse_equals_masked_for_2d_and_3d_inputs(shape):
    layer = make_layer()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.inference_impl = "masked"
        ref = layer(x)
        layer.inference_impl = "sparse"
        out = layer(x)
    assert out.shape == x.shape
    assert 0 < layer.last_active.float().mean() < 1  # a genuinely sparse pattern
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("grad", [False, True])  # with autograd, no expert weight may become a host float
@pytest.mark.parametrize("rescale", [True, False])  # eq. 8 on or off (Fig. 2)
def test_decode_token_equals_masked_layer_for_every_pattern(bias, grad, rescale):
    """One token through the layer (fast.decode_token) for all 2^n activity patterns, 0 and n active included."""
    layer = make_layer(bias=bias)
    layer.rescale = rescale
    x = torch.randn(1, D_MODEL, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(N, dtype=torch.float64)
    for bits in range(2**N):
        pattern = torch.tensor([bits >> i & 1 for i in range(N)], dtype=torch.bool)
        logits = torch.where(pattern, 1.0, -1.0) * (0.1 + 2 * torch.rand(N, generator=g))
        with torch.no_grad():
            layer.router.weight.copy_(torch.outer(logits, x[0]) / x.square().sum())  # x·Yᵀ = logits
            ref = layer.masked_forward(x, layer.expert_weights(layer.gates(x))[0])
        with torch.set_grad_enabled(grad):
            out = layer(x)
        assert out.requires_grad == (grad and (bits > 0 or bias))  # no expert: zeros (+ the down bias)
        with torch.no_grad():
            assert torch.equal(layer.last_active[0], pattern)
            torch.testing.assert_close(out, ref, **TOL, msg=f"pattern {pattern.int().tolist()}")
            counts += pattern
            if not bits:
                assert torch.equal(out, layer.down_proj.bias.expand(1, -1) if bias else torch.zeros(1, D_MODEL))
    assert layer.tokens_seen == 2**N
    assert layer.expert_tokens == counts.tolist()


@pytest.mark.parametrize("tokens", [1, 3, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_paths_under_autocast_equal_masked_path(tokens, dtype):
    """Lightning's bf16-mixed validation runs eval forwards under autocast: no in-place op may mix dtypes."""
    layer = make_layer(bias=True)
    x = torch.randn(tokens, D_MODEL, dtype=dtype, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        layer.inference_impl = "masked"
        ref = layer(x)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("tokens", [1, 3, 37])
@pytest.mark.parametrize("bias", [False, True])
def test_fast_paths_of_a_bf16_layer_equal_masked_path(tokens, bias):
    """A model loaded in bf16 (no autocast): every op of the fast paths stays in the weights' dtype."""
    layer = make_layer(bias=bias).to(torch.bfloat16)
    x = torch.randn(tokens, D_MODEL, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = layer(x)
        layer.inference_impl = "masked"
        ref = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0.02, atol=0.02)


def test_layer_eval_uses_the_fast_path(monkeypatch):
    layer, calls = make_layer(), []
    import dsmoe.fast as fast

    monkeypatch.setattr(
        fast, "sparse_forward", lambda *a, **kw: calls.append(len(a[1])) or a[0].masked_forward(a[1], a[2])
    )
    with torch.no_grad():
        layer(torch.randn(DECODE_MAX_TOKENS + 1, D_MODEL))
        layer.inference_impl = "masked"
        layer(torch.randn(2, D_MODEL))
        layer.train()
        layer(torch.randn(3, D_MODEL))
    assert calls == [DECODE_MAX_TOKENS + 1]


def test_expert_runs():
    assert expert_runs([False] * N) == []
    assert expert_runs([1, 1, 0, 0, 1, 0, 1, 1]) == [(0, 2), (4, 5), (6, 8)]
    assert expert_runs([True] * N) == [(0, N)]


def test_cache_follows_weight_changes_and_stays_out_of_state_dict():
    layer = make_layer()
    keys = set(layer.state_dict())
    x = torch.randn(7, D_MODEL)
    with torch.no_grad():
        layer(x)
        assert layer.fast_cache is not None and set(layer.state_dict()) == keys
        layer.down_proj.weight.mul_(-2.0)  # in-place: version counter moves
        layer.inference_impl = "masked"
        ref = layer(x)
        layer.inference_impl = "sparse"
        torch.testing.assert_close(layer(x), ref, **TOL)
        other = make_layer(seed=1)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), other(x), **TOL)
        layer.down_proj.weight = nn.Parameter(torch.randn(D_MODEL, D_FF))  # replaced parameter
        layer.inference_impl = "masked"
        ref = layer(x)
        layer.inference_impl = "sparse"
        torch.testing.assert_close(layer(x), ref, **TOL)


@pytest.mark.parametrize("tokens", [1, 9])
def test_eval_mode_gradients_equal_masked_path(tokens):
    layer = make_layer()
    x = torch.randn(tokens, D_MODEL)
    grads = {}
    for impl in ("masked", "sparse"):
        layer.zero_grad()
        layer.inference_impl = impl
        layer(x).square().sum().backward()
        grads[impl] = {k: p.grad.clone() for k, p in layer.named_parameters()}
    for k in grads["masked"]:
        torch.testing.assert_close(grads["sparse"][k], grads["masked"][k], rtol=1e-5, atol=1e-5, msg=k)


def test_cache_built_in_inference_mode_serves_input_gradients_later():
    layer = make_layer().requires_grad_(False)
    x = torch.randn(7, D_MODEL)
    with torch.inference_mode():
        layer(x)  # builds the cache
    grads = []
    for impl in ("masked", "sparse"):
        layer.inference_impl = impl
        xg = x.clone().requires_grad_()
        layer(xg).square().sum().backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generate_same_tokens_fast_and_masked(batch):
    model = convert(tiny_model("llama", seed=0), DSMoEConfig(num_experts=4, tau=0.5, router_init_std=0.2)).eval()
    prompt = torch.randint(0, 256, (batch, 7), generator=torch.Generator().manual_seed(0))
    outputs, fractions = {}, []
    for impl in ("masked", "sparse"):
        for layer in dsmoe_layers(model):
            layer.inference_impl = impl
            layer.reset_stats()
        outputs[impl] = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, use_cache=True
        )
        fractions.append(activation_stats(model).mean_active_per_layer)  # counted on the host when decoding
    assert 0 < sum(fractions[0]) < 4 * len(fractions[0])  # neither all nor no experts active
    assert fractions[0] == pytest.approx(fractions[1])
    assert outputs["sparse"].shape == (batch, 7 + 12)
    assert torch.equal(outputs["sparse"], outputs["masked"])


def test_expert_token_indices_one_call_equals_one_per_expert():
    from dsmoe.fast import expert_token_indices

    torch.manual_seed(0)
    active = torch.rand(37, 8) > 0.5
    active[:, 5] = True  # every token
    active[:, 6] = False  # none
    counts = active.sum(0).tolist()
    for experts in ([0, 2, 3, 5, 7], [4], []):
        per_expert = expert_token_indices(active, experts, counts, one_call=False)
        one = expert_token_indices(active, experts, counts, one_call=True)
        assert len(one) == len(experts) and all(torch.equal(a, b) for a, b in zip(per_expert, one, strict=True))


def test_eval_forward_off_the_cpu_needs_no_host_sync():
    """On an accelerator the layer takes the masked path with device-side counters: run on the meta device, where
    any read of a value to the host (.tolist(), .item(), nonzero) raises."""
    layer = convert(tiny_model("llama"), DSMoEConfig(num_experts=4)).model.layers[0].mlp.eval()
    layer.to("meta")
    with torch.no_grad():
        out = layer(torch.empty(2, 5, 64, device="meta"))
        layer(torch.empty(1, 1, 64, device="meta"))  # batch-1 decode too
    assert out.shape == (2, 5, 64) and layer.tokens_seen == 11 and layer._device_counts.device.type == "meta"


def test_padded_eval_counts_need_no_host_sync():
    """count_only (a padded batch, or validation windows that may be fillers) keeps the counted tokens on the
    device too: on the meta device any host read raises; on the CPU the counts are those of the real rows."""
    model = convert(tiny_model("llama"), DSMoEConfig(num_experts=4)).model.eval()
    rows = torch.tensor([[True] * 5, [True, True, False, False, False]])
    x = torch.randn(2, 5, 64)
    layer = model.layers[0].mlp
    with torch.no_grad():
        count_only(model, rows)
        layer(x)
        count_only(model, None)
        active = layer.last_active
    assert layer.tokens_seen == 7 and layer.expert_tokens == active[rows.reshape(-1)].sum(0).tolist()
    model.to("meta")
    layer.reset_stats()
    with torch.no_grad():
        count_only(model, rows.to("meta"))
        layer(torch.empty(2, 5, 64, device="meta"))
    assert layer._device_tokens.device.type == "meta" and layer._device_counts.device.type == "meta"


def test_decode_thresholds_a_gate_equal_to_tau_like_the_other_paths():
    """σ(xY) exactly fp32(τ) for τ = 0.3 (not representable): the batch-1 decode path compares in the gate's dtype,
    as the masked and multi-token paths do (comparing Python floats would turn the expert on)."""
    d = 8
    layer = dsmoe_layer(d, 16, DSMoEConfig(num_experts=2, tau=0.3), router_std=1.0).eval()
    x = torch.zeros(1, d)
    x[0, 0] = 1.0
    logit = torch.logit(torch.tensor(0.3, dtype=torch.float64)).float()
    for candidate in (logit, torch.nextafter(logit, torch.tensor(1.0)), torch.nextafter(logit, torch.tensor(-1.0))):
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[0, 0], layer.router.weight[1, 0] = candidate, 2.2
        if layer.gates(x)[0, 0].item() == torch.tensor(0.3).item():
            break
    assert layer.gates(x)[0, 0].item() == torch.tensor(0.3).item() > 0.3
    with torch.no_grad():
        layer.inference_impl = "masked"
        masked = layer(x)
        layer.inference_impl = "sparse"
        torch.testing.assert_close(layer(x), masked, rtol=0, atol=1e-6)  # batch 1: fast.decode_token
        torch.testing.assert_close(layer(torch.cat([x, x]))[:1], masked, rtol=0, atol=1e-6)
