"""LLaMA-MoE top-k baseline against token-by-token references, a hand-computed balance loss and Shazeer's P(x, i)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from dsmoe.baselines.topk_moe import (
    TOPK_MOE,
    TopKMoEConfig,
    TopKMoEMLP,
    activated_params,
    balance_loss,
    predicted_activated_params,
    topk_moe_layers,
)
from dsmoe.hf_remote.partitioned_swiglu import smooth_load
from dsmoe.models import tiny_model
from dsmoe.stats import count_params

D_MODEL, D_FF, N = 16, 32, 4


def make_layer(top_k=2, seed=0, router_std=1.0, **cfg):
    torch.manual_seed(seed)
    mlp = LlamaMLP(
        LlamaConfig(hidden_size=D_MODEL, intermediate_size=D_FF, num_attention_heads=4, num_key_value_heads=2)
    )
    layer = TopKMoEMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn, TopKMoEConfig(N, top_k, **cfg))
    if router_std:
        nn.init.normal_(layer.router.weight, std=router_std)
    return layer.double(), mlp.double()


def expert_out(layer, x, i):
    m, s = D_FF // N, slice(i * D_FF // N, (i + 1) * D_FF // N)
    assert m == layer.expert_size
    return (F.silu(layer.gate_proj.weight[s] @ x) * (layer.up_proj.weight[s] @ x)) @ layer.down_proj.weight[:, s].T


def reference_forward(layer, x):
    """Per token: logits = x·W_gᵀ, top-k by sorting, softmax over them, y = s·Σ score_j·E_j(x) (no noise)."""
    out = []
    for t in range(x.shape[0]):
        logits = (layer.router.weight @ x[t]).tolist()
        top = sorted(range(N), key=lambda i: -logits[i])[: layer.top_k]
        z = [math.exp(logits[i]) for i in top]
        out.append(sum(layer.scale * z[j] / sum(z) * expert_out(layer, x[t], i) for j, i in enumerate(top)))
    return torch.stack(out)


@pytest.mark.parametrize("top_k", [1, 3, N])  # N: every expert on every token, computed as one run
def test_training_forward_and_gradients_match_reference(top_k):
    layer, _ = make_layer(top_k, noisy_gating=False)
    layer.train()
    x = torch.randn(37, D_MODEL, dtype=torch.float64)
    w = torch.randn(37, D_MODEL, dtype=torch.float64)
    grads = {}
    for name, fn in (("layer", layer), ("reference", lambda x: differentiable_reference(layer, x))):
        layer.zero_grad()
        y = fn(x)
        (y * w).sum().backward()
        grads[name] = (y.detach(), {k: p.grad.clone() for k, p in layer.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads["layer"][0], grads["reference"][0])
    assert grads["layer"][1].keys() == grads["reference"][1].keys()
    for k, g in grads["reference"][1].items():
        torch.testing.assert_close(grads["layer"][1][k], g, msg=k)


def differentiable_reference(layer, x):
    """reference_forward with the top-k softmax kept in autograd (gradients reach the router)."""
    out = []
    for t in range(x.shape[0]):
        logits = (layer.router.weight @ x[t]).float()  # the layer routes in fp32
        top = logits.topk(layer.top_k).indices
        scores = logits[top].softmax(0).to(x.dtype)
        out.append(layer.scale * sum(scores[j] * expert_out(layer, x[t], i) for j, i in enumerate(top.tolist())))
    return torch.stack(out)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_eval_forward_matches_reference_and_routes_exactly_k(top_k):
    layer, _ = make_layer(top_k)
    layer.eval()
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y.reshape(-1, D_MODEL), reference_forward(layer, x.reshape(-1, D_MODEL)))
    idx = layer.last_indices
    assert idx.shape == (14, top_k)
    assert all(len(set(row.tolist())) == top_k for row in idx)


def test_training_routes_exactly_k_with_noise():
    layer, _ = make_layer(2)
    nn.init.normal_(layer.noise.weight, std=1.0)
    layer.train()
    layer(torch.randn(50, D_MODEL, dtype=torch.float64))
    assert layer.last_indices.shape == (50, 2)
    assert all(len(set(row.tolist())) == 2 for row in layer.last_indices)


def test_only_selected_experts_are_computed():
    """Unselected experts' weights set to NaN must not reach the output."""
    layer, _ = make_layer(2)
    layer.eval()
    x = torch.randn(1, D_MODEL, dtype=torch.float64)
    expected = reference_forward(layer, x)
    layer(x)
    chosen = set(layer.last_indices[0].tolist())
    with torch.no_grad():
        for i in set(range(N)) - chosen:
            s = slice(i * layer.expert_size, (i + 1) * layer.expert_size)
            layer.gate_proj.weight[s] = float("nan")
            layer.up_proj.weight[s] = float("nan")
            layer.down_proj.weight[:, s] = float("nan")
    torch.testing.assert_close(layer(x), expected)


def test_all_experts_uniform_router_equals_dense_mlp():
    """k = n, zero router (LLaMA-MoE's init) → softmax weights 1/n; with s = n, Σ_i E_i(x) = the dense FFN (eq. 5)."""
    layer, mlp = make_layer(top_k=N, router_std=0, score_scale_factor=float(N))
    x = torch.randn(3, 5, D_MODEL, dtype=torch.float64)
    for training in (False, True):
        layer.train(training)
        layer.noisy_gating = False
        torch.testing.assert_close(layer(x), mlp(x))


def test_all_experts_with_router_equals_softmax_weighted_channels():
    """k = n, s = 1: y = V·((act(xW) ⊙ xU) ⊙ p̃), p̃ = softmax(x·W_g) repeated over each expert's m channels."""
    layer, mlp = make_layer(top_k=N, score_scale_factor=1.0)
    layer.eval()
    x = torch.randn(9, D_MODEL, dtype=torch.float64)
    p = torch.softmax(x @ layer.router.weight.T, -1).repeat_interleave(D_FF // N, dim=-1)
    expected = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) * p)
    torch.testing.assert_close(layer(x), expected)


def test_default_scale_is_n_over_k():
    assert TopKMoEConfig(8, 3).scale == pytest.approx(8 / 3)
    assert TopKMoEConfig(16, 4).scale == 4.0  # LLaMA-MoE-3.5B (4/16)
    assert TopKMoEConfig(8, 3, score_scale_factor=1.0).scale == 1.0


def test_balance_loss_matches_hand_computation_without_noise():
    layer, _ = make_layer(2, noisy_gating=False)
    layer.train()
    assert layer.noise is None
    x = torch.randn(6, D_MODEL, dtype=torch.float64)
    layer(x)
    importance, load = [0.0] * N, [0.0] * N
    for t in range(6):
        logits = (layer.router.weight @ x[t]).tolist()
        top = sorted(range(N), key=lambda i: -logits[i])[:2]
        z = [math.exp(logits[i]) for i in top]
        for j, i in enumerate(top):
            importance[i] += z[j] / sum(z)
            load[i] += 1

    def cv2(v):  # unbiased variance over mean², as LLaMA-MoE's cv_squared
        mean = sum(v) / len(v)
        return sum((a - mean) ** 2 for a in v) / (len(v) - 1) / (mean**2 + 1e-10)

    assert layer.last_balance_loss.item() == pytest.approx(cv2(importance) + cv2(load), rel=1e-6)


def test_smooth_load_is_shazeer_probability():
    """P(x, i) = Φ((clean_i − kth_excluding(noisy, k, i)) / std_i), kth_excluding from its definition."""
    torch.manual_seed(1)
    T, k = 7, 2
    clean = torch.randn(T, N, dtype=torch.float64)
    std = torch.rand(T, N, dtype=torch.float64) + 0.1
    noisy = clean + torch.randn_like(clean) * std
    top_values, _ = noisy.topk(k + 1, dim=-1)
    expected = torch.zeros(N, dtype=torch.float64)
    for t in range(T):
        for i in range(N):
            others = sorted((noisy[t, j].item() for j in range(N) if j != i), reverse=True)
            z = (clean[t, i].item() - others[k - 1]) / std[t, i].item()
            expected[i] += 0.5 * (1 + math.erf(z / math.sqrt(2)))
    torch.testing.assert_close(smooth_load(clean, noisy, std, top_values, k), expected)


def test_noisy_balance_loss_trains_router_and_noise_network():
    layer, _ = make_layer(2)
    layer.train()
    layer(torch.randn(40, D_MODEL, dtype=torch.float64))
    layer.last_balance_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.noise.weight.grad.abs().sum() > 0  # through the smooth load estimator


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("gate", ["linear", "mlp"])
def test_activated_params_accounting(arch, gate):
    model = tiny_model(arch)
    dense = count_params(model)
    L, d, D, n, k = 2, 64, 128, 8, 3
    cfg = TopKMoEConfig(n, k, gate_network=gate)
    predicted = predicted_activated_params(model, cfg)
    TOPK_MOE.apply(model, cfg.to_dict(), None)
    router = d * n + (n * n if gate == "mlp" else 0)
    assert count_params(model) == dense + L * (router + d * n)  # + routers + noise networks
    assert count_params(TOPK_MOE.apply(tiny_model(arch), {"noisy_gating": False}, None)) == dense + L * d * n
    hand = dense + L * router - L * 3 * d * D * (1 - k / n)  # noise nets are training-only
    assert activated_params(model) == pytest.approx(hand)
    assert TOPK_MOE.activated_params(model) == pytest.approx(predicted)


def test_balance_loss_sums_layers_with_weight():
    model = tiny_model("llama")
    TOPK_MOE.apply(model, {"balance_weight": 0.5}, None)
    model.train()
    model(torch.randint(0, 256, (2, 9)))
    per_layer = [layer.last_balance_loss for layer in topk_moe_layers(model)]
    torch.testing.assert_close(balance_loss(model), 0.5 * (per_layer[0] + per_layer[1]))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_method_trains_a_few_steps(arch):
    torch.manual_seed(0)
    model = TOPK_MOE.apply(tiny_model(arch), {"num_experts": 4, "top_k": 2}, None)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 256, (2, 12))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        aux = TOPK_MOE.aux_losses(model)
        total = loss + sum(aux.values())
        assert torch.isfinite(total) and set(aux) == {"balance"}
        opt.zero_grad()
        total.backward()
        assert all(layer.router.weight.grad.abs().sum() > 0 for layer in topk_moe_layers(model))
        opt.step()


@pytest.mark.parametrize("gate", ["linear", "mlp"])
def test_save_load_round_trip(tmp_path, gate):
    model = TOPK_MOE.apply(tiny_model("llama"), {"gate_network": gate, "top_k": 2}, None)
    with torch.no_grad():
        for layer in topk_moe_layers(model):
            for p in list(layer.router.parameters()) + [layer.noise.weight]:
                p.normal_()
    model.eval()
    ids = torch.randint(0, 256, (2, 10))
    expected = model(ids).logits
    TOPK_MOE.save(model, tmp_path, None)
    loaded = TOPK_MOE.load(tmp_path)
    assert [layer.top_k for layer in topk_moe_layers(loaded)] == [2, 2]
    for a, b in zip(topk_moe_layers(model), topk_moe_layers(loaded), strict=True):
        torch.testing.assert_close(a.noise.weight, b.noise.weight)
    torch.testing.assert_close(loaded(ids).logits, expected)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="top_k=9 exceeds num_experts=8"):
        TopKMoEConfig(8, 9)
    with pytest.raises(ValueError, match="gate_network"):
        TopKMoEConfig(gate_network="conv")
    with pytest.raises(ValueError, match="not divisible by num_experts=5"):
        TOPK_MOE.apply(tiny_model("llama"), {"num_experts": 5, "top_k": 1}, None)
    with pytest.raises(ValueError, match="already converted"):
        TOPK_MOE.apply(TOPK_MOE.apply(tiny_model("llama"), {}, None), {}, None)
