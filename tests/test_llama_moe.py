"""LLaMA-MoE top-k baseline against a token-by-token reference of its routing (Zhu et al. 2024; noisy gating and
load of Shazeer et al. 2017, written out plainly here), a hand-computed balance loss, and autograd through both."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from dsmoe.baselines.llama_moe import (
    LLAMA_MOE,
    LlamaMoEConfig,
    LlamaMoEMLP,
    activated_params,
    llama_moe_layers,
    predicted_activated_params,
)
from dsmoe.hf_remote.partitioned_swiglu import smooth_load, swiglu_parts
from dsmoe.stats import count_params

D_MODEL, D_FF, N = 16, 32, 4
NOISE_EPSILON = 1e-2  # LLaMA-MoE's noise_epsilon


def make_layer(top_k=2, seed=0, router_std=1.0, **cfg):
    torch.manual_seed(seed)
    mlp = LlamaMLP(
        LlamaConfig(hidden_size=D_MODEL, intermediate_size=D_FF, num_attention_heads=4, num_key_value_heads=2)
    )
    layer = LlamaMoEMLP(swiglu_parts(mlp), LlamaMoEConfig(N, top_k, **cfg))
    if router_std:
        nn.init.normal_(layer.router.weight, std=router_std)
    return layer.double(), mlp.double()


def expert_out(layer, x, i):
    """E_i(x) = (silu(x·W_i) ⊙ x·U_i)·V_i, expert i owning intermediate channels [i·m, (i+1)·m)."""
    m = layer.gate_proj.out_features // layer.num_experts
    s = slice(i * m, (i + 1) * m)
    return (F.silu(layer.gate_proj.weight[s] @ x) * (layer.up_proj.weight[s] @ x)) @ layer.down_proj.weight[:, s].T


def gate_logits(layer, x, eps=None):
    """(clean, H(x), std): clean = x·W_g, H(x) = clean + ε ⊙ (softplus(x·W_noise) + noise_epsilon) with noise."""
    clean = x @ layer.router.weight.T
    if eps is None:
        return clean, clean, None
    std = F.softplus(x @ layer.noise.weight.T) + NOISE_EPSILON
    return clean, clean + eps.to(clean.dtype) * std, std


def phi(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def cv_squared(v):
    """Unbiased variance over mean², as LLaMA-MoE's cv_squared."""
    mean = sum(v) / len(v)
    return sum((a - mean) ** 2 for a in v) / (len(v) - 1) / (mean**2 + 1e-10)


def reference_layer(layer, x, scale, eps=None):
    """LLaMA-MoE token by token, in autograd: (y [T, d], top-k experts per token, cv²(Importance) + cv²(Load)).

    Per token: the k largest H(x) by sorting, softmax over them, y = scale · Σ_j score_j · E_j(x). Importance_i =
    Σ_x score(x, i); Load_i = Σ_x P(x, i), P(x, i) = Φ((clean_i − k-th largest H(x)_j over j ≠ i) / std_i) with
    noise (Shazeer et al. eqs. 8–10), else the number of tokens routed to i (LLaMA-MoE's fallback)."""
    k = layer.top_k
    clean, logits, std = gate_logits(layer, x, eps)
    outputs, routes = [], []
    importance, load = [x.new_zeros(()) for _ in range(N)], [x.new_zeros(()) for _ in range(N)]
    for t in range(x.shape[0]):
        values = logits[t].tolist()
        top = sorted(range(N), key=lambda i: -values[i])[:k]
        scores = torch.stack([logits[t, i] for i in top]).softmax(0)
        outputs.append(scale * sum(scores[j] * expert_out(layer, x[t], i) for j, i in enumerate(top)))
        routes.append(set(top))
        for j, i in enumerate(top):
            importance[i] = importance[i] + scores[j]
            if std is None:
                load[i] = load[i] + 1
        for i in range(N) if std is not None else ():
            kth = sorted((logits[t, j] for j in range(N) if j != i), key=lambda v: -v.item())[k - 1]
            load[i] = load[i] + phi((clean[t, i] - kth) / std[t, i])
    return torch.stack(outputs), routes, cv_squared(importance) + cv_squared(load)


def assert_routes(layer, routes):
    assert [set(row) for row in layer.last_indices.tolist()] == routes


@pytest.mark.parametrize("impl", ["sparse", "masked"])  # masked: what accelerators run (no host sync per layer)
@pytest.mark.parametrize("top_k", [1, 3, N])  # N: every expert on every token, computed as one run
def test_training_forward_and_gradients_match_reference(top_k, impl):
    layer, _ = make_layer(top_k, noisy_gating=False)
    layer.train()
    layer.impl = impl
    x = torch.randn(37, D_MODEL, dtype=torch.float64)
    w = torch.randn(37, D_MODEL, dtype=torch.float64)
    grads = {}
    for name, fn in (("layer", layer), ("reference", lambda x: reference_layer(layer, x, N / top_k)[0])):
        layer.zero_grad()
        y = fn(x)
        (y * w).sum().backward()
        grads[name] = (y.detach(), {k: p.grad.clone() for k, p in layer.named_parameters() if p.grad is not None})
    fp32 = {"rtol": 1e-5, "atol": 1e-6}  # the layer routes in fp32
    torch.testing.assert_close(grads["layer"][0], grads["reference"][0], **fp32)
    assert grads["layer"][1].keys() == grads["reference"][1].keys()
    for k, g in grads["reference"][1].items():
        torch.testing.assert_close(grads["layer"][1][k], g, **fp32, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_eval_forward_matches_reference_with_scale_n_over_k(top_k):
    """The default score_scale_factor is n/k (LLaMA-MoE's released configurations), here from the hand value."""
    layer, _ = make_layer(top_k)
    layer.eval()
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    y = layer(x)
    expected, routes, _ = reference_layer(layer, x.reshape(-1, D_MODEL), N / top_k)
    torch.testing.assert_close(y.reshape(-1, D_MODEL), expected)
    assert_routes(layer, routes)
    layer.impl = "masked"
    torch.testing.assert_close(layer(x).reshape(-1, D_MODEL), expected)


def test_noisy_training_routing_matches_reference():
    """Training routes by H(x) = x·W_g + ε ⊙ (softplus(x·W_noise) + 1e-2), ε the layer's N(0, 1) draw; eval by x·W_g."""
    layer, _ = make_layer(2)
    nn.init.normal_(layer.noise.weight, std=1.0)
    x = torch.randn(50, D_MODEL, dtype=torch.float64)
    layer.train()
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    eps = torch.randn(50, N)  # the layer draws ε [tokens, n] in fp32, its routing precision
    expected, routes, _ = reference_layer(layer, x, N / 2, eps)
    assert_routes(layer, routes)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    layer.eval()
    clean, clean_routes, _ = reference_layer(layer, x, N / 2)
    assert clean_routes != routes  # the noise does change the routing here
    torch.testing.assert_close(layer(x), clean, rtol=1e-5, atol=1e-6)
    assert_routes(layer, clean_routes)


def test_only_selected_experts_are_computed():
    """Unselected experts' weights set to NaN must not reach the output."""
    layer, _ = make_layer(2)
    layer.eval()
    x = torch.randn(1, D_MODEL, dtype=torch.float64)
    expected, (chosen,), _ = reference_layer(layer, x, N / 2)
    with torch.no_grad():
        for i in set(range(N)) - chosen:
            s = slice(i * layer.expert_size, (i + 1) * layer.expert_size)
            layer.gate_proj.weight[s] = float("nan")
            layer.up_proj.weight[s] = float("nan")
            layer.down_proj.weight[:, s] = float("nan")
    torch.testing.assert_close(layer(x), expected.detach())


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
    assert layer.last_balance_loss.item() == pytest.approx(cv_squared(importance) + cv_squared(load), rel=1e-6)


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


@pytest.mark.parametrize("top_k", [1, 2])
def test_noisy_balance_loss_and_its_gradients_match_reference(top_k):
    """With noise the balance loss cv²(Importance) + cv²(Load) reaches W_g and W_noise through the softmax scores
    and Shazeer's smooth Load: its value and both gradients equal autograd through the token-by-token reference."""
    layer, _ = make_layer(top_k)
    nn.init.normal_(layer.noise.weight, std=0.5)
    layer.train()
    x = torch.randn(20, D_MODEL, dtype=torch.float64)
    torch.manual_seed(3)
    layer(x)
    layer.last_balance_loss.backward()
    got = {name: p.grad.clone() for name, p in (("router", layer.router.weight), ("noise", layer.noise.weight))}
    layer.zero_grad()
    torch.manual_seed(3)
    _, _, expected = reference_layer(layer, x, N / top_k, torch.randn(20, N))
    expected.backward()
    torch.testing.assert_close(layer.last_balance_loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["router"], layer.router.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["noise"], layer.noise.weight.grad, rtol=1e-4, atol=1e-6)
    assert got["noise"].abs().sum() > 0.1 * got["router"].abs().sum()  # W_noise does learn from the load


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("gate", ["linear", "mlp"])
def test_activated_params_accounting(arch, gate):
    model = tiny_model(arch)
    dense = count_params(model)
    L, d, D, n, k = 2, 64, 128, 8, 3
    cfg = LlamaMoEConfig(n, k, gate_network=gate)
    predicted = predicted_activated_params(model, cfg)
    LLAMA_MOE.apply(model, cfg.to_dict(), None)
    router = d * n + (n * n if gate == "mlp" else 0)
    assert count_params(model) == dense + L * (router + d * n)  # + routers + noise networks
    assert count_params(LLAMA_MOE.apply(tiny_model(arch), {"noisy_gating": False}, None)) == dense + L * d * n
    hand = dense + L * router - L * 3 * d * D * (1 - k / n)  # noise nets are training-only
    assert activated_params(model) == pytest.approx(hand)
    assert LLAMA_MOE.activated_params(model) == pytest.approx(predicted)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_method_loss_and_gradients_match_token_by_token_reference(arch):
    """A training step of the converted model (noisy gate, LM loss + w·Σ_layers balance loss, w = 0.5): the loss
    and every parameter's gradient equal those of the same model whose MoE layers run the reference."""
    model = LLAMA_MOE.apply(tiny_model(arch), {"num_experts": N, "top_k": 2, "balance_weight": 0.5}, None)
    with torch.no_grad():
        for layer in llama_moe_layers(model):
            layer.router.weight.normal_(0, 0.3)
            layer.noise.weight.normal_(0, 0.3)
    reference = copy.deepcopy(model)
    balance = []

    def reference_forward(layer, x):  # draws ε as the layer does: one N(0, 1) [tokens, n] fp32 tensor per call
        flat = x.reshape(-1, x.shape[-1])
        y, _, loss = reference_layer(layer, flat, N / 2, torch.randn(flat.shape[0], N))
        balance.append(loss)
        return y.reshape(x.shape)

    for layer in llama_moe_layers(reference):
        layer.forward = lambda x, layer=layer: reference_forward(layer, x)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = {}
    for name, m in (("model", model), ("reference", reference)):
        m.train()
        torch.manual_seed(11)
        loss = m(input_ids=ids, labels=ids).loss
        aux = LLAMA_MOE.aux_losses(model)["balance"] if m is model else 0.5 * sum(balance)
        (loss + aux).backward()
        losses[name] = (loss.item(), aux.item())
    assert losses["model"] == pytest.approx(losses["reference"], rel=1e-5)
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("gate", ["linear", "mlp"])
def test_save_load_round_trip(tmp_path, gate):
    model = LLAMA_MOE.apply(tiny_model("llama"), {"gate_network": gate, "top_k": 2}, None)
    with torch.no_grad():
        for layer in llama_moe_layers(model):
            for p in list(layer.router.parameters()) + [layer.noise.weight]:
                p.normal_()
    model.eval()
    ids = torch.randint(0, 256, (2, 10))
    expected = model(ids).logits
    LLAMA_MOE.save(model, tmp_path, None)
    loaded = LLAMA_MOE.load(tmp_path)
    assert [layer.top_k for layer in llama_moe_layers(loaded)] == [2, 2]
    for a, b in zip(llama_moe_layers(model), llama_moe_layers(loaded), strict=True):
        torch.testing.assert_close(a.noise.weight, b.noise.weight)
    torch.testing.assert_close(loaded(ids).logits, expected)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="top_k=9 exceeds num_experts=8"):
        LlamaMoEConfig(8, 9)
    with pytest.raises(ValueError, match="gate_network"):
        LlamaMoEConfig(gate_network="conv")
    with pytest.raises(ValueError, match="not divisible by num_experts=5"):
        LLAMA_MOE.apply(tiny_model("llama"), {"num_experts": 5, "top_k": 1}, None)
    with pytest.raises(ValueError, match="already converted"):
        LLAMA_MOE.apply(LLAMA_MOE.apply(tiny_model("llama"), {}, None), {}, None)


def test_auto_takes_the_masked_path_off_the_cpu():
    """On an accelerator no path may read tokens per expert to the host; the meta device stands in for one (the
    sparse path's .tolist() cannot run there)."""
    layer, _ = make_layer(2, noisy_gating=False)
    layer.train().to("meta")
    out = layer(torch.empty(5, D_MODEL, dtype=torch.float64, device="meta"))
    assert out.shape == (5, D_MODEL) and out.device.type == "meta"
    layer.impl = "sparse"
    with pytest.raises((NotImplementedError, RuntimeError)):
        layer(torch.empty(5, D_MODEL, dtype=torch.float64, device="meta"))
