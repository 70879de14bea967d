"""DSMoEMLP against an independent loop-over-experts reference of eqs. 6-8, 10-11, 13-16, 19, 20."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import dsmoe_layer
from torch import nn
from transformers import LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from dsmoe import DSMoEConfig, DSMoEMLP, sparsity_loss
from dsmoe.hf_remote.partitioned_swiglu import SwiGLUParts, swiglu_parts

D_MODEL, D_FF, N = 16, 32, 4


def make_layer(variant="dsmoe", tau=0.5, seed=0, router_std=1.0):
    return dsmoe_layer(D_MODEL, D_FF, DSMoEConfig(N, tau, variant), seed, router_std).double()


def reference_forward(layer, x, training):
    """Token-by-token, expert-by-expert: o_i = (silu(x W_i) ⊙ x U_i) V_i; h = n/#active Σ o_i G(g_i)."""
    W, U, V, Y = layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight, layer.router.weight
    m = D_FF // N
    out = []
    for t in range(x.shape[0]):
        g = [torch.sigmoid(x[t] @ Y[i]) for i in range(N)]
        o = [
            (F.silu(W[i * m : (i + 1) * m] @ x[t]) * (U[i * m : (i + 1) * m] @ x[t])) @ V[:, i * m : (i + 1) * m].T
            for i in range(N)
        ]
        if training and layer.variant == "no_gate":  # eq. 20
            out.append(sum(o[i] * g[i] for i in range(N)))
            continue
        active = [i for i in range(N) if g[i] > layer.tau]
        h = sum((o[i] * g[i] for i in active), torch.zeros(D_MODEL, dtype=x.dtype))
        out.append(h * N / len(active) if active else h)  # eq. 8
    return torch.stack(out)


def hand_gradients(layer, x, c, training):
    """∂(Σ_t c_t·h_t)/∂{Y, V, W, U} from eqs. 13-16 (and eq. 7 / eq. 20 for the ablations)."""
    W, U, V, Y = (
        p.detach() for p in (layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight, layer.router.weight)
    )
    m = D_FF // N
    grads = {k: torch.zeros_like(p) for k, p in dict(Y=Y, V=V, W=W, U=U).items()}
    for t in range(x.shape[0]):
        xt, ct = x[t], c[t]
        g = torch.sigmoid(Y @ xt)
        active = g > layer.tau
        soft = training and layer.variant == "no_gate"
        scale = 1.0 if soft else N / max(int(active.sum()), 1)
        for i in range(N):
            s = slice(i * m, (i + 1) * m)
            pre, u = W[s] @ xt, U[s] @ xt
            a, da = F.silu(pre), torch.sigmoid(pre) * (1 + pre * (1 - torch.sigmoid(pre)))
            o = (a * u) @ V[:, s].T
            on = soft or bool(active[i])
            w = (g[i] if on else 0.0) * scale  # forward weight G(g_i)·n/#active (or σ for eq. 20)
            gate_grad_flows = soft or on or (training and layer.variant == "dsmoe")  # STE: eq. 16 for every gate
            if gate_grad_flows:
                grads["Y"][i] += scale * (ct @ o) * g[i] * (1 - g[i]) * xt
            grads["V"][:, s] += torch.outer(ct, a * u * w)  # eq. 13
            dz = (V[:, s].T @ ct) * w
            grads["W"][s] += torch.outer(dz * u * da, xt)  # eq. 14
            grads["U"][s] += torch.outer(dz * a, xt)  # eq. 15
    return grads


@pytest.mark.parametrize("variant", ["dsmoe", "no_ste", "no_gate"])
@pytest.mark.parametrize("tau", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("training", [True, False])
def test_forward_and_gradients_match_reference(variant, tau, training):
    layer = make_layer(variant, tau)
    layer.train(training)
    torch.manual_seed(1)
    x = torch.randn(12, D_MODEL, dtype=torch.float64)
    # token 0 with no active expert, token 1 with all experts active
    with torch.no_grad():
        x[0] = 0.0
        layer.router.weight[:, :] = layer.router.weight - layer.router.weight.mean(0)
        x[0, 0] = 1.0
        layer.router.weight[:, 0] = -8.0
        x[1] = 0.0
        x[1, 1] = 1.0
        layer.router.weight[:, 1] = 8.0
    counts = (torch.sigmoid(x @ layer.router.weight.T) > tau).sum(1)
    assert counts[0] == 0 and counts[1] == N and 0 < counts[2:].float().mean() < N
    h = layer(x)
    torch.testing.assert_close(h, reference_forward(layer, x, training))
    if not (training or variant == "no_gate"):
        assert torch.all(h[0] == 0)
    c = torch.randn_like(h)
    (h * c).sum().backward()
    expected = hand_gradients(layer, x, c, training)
    got = dict(
        Y=layer.router.weight.grad,
        V=layer.down_proj.weight.grad,
        W=layer.gate_proj.weight.grad,
        U=layer.up_proj.weight.grad,
    )
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], msg=f"gradient of {k}")


def test_inactive_experts_get_zero_weight_gradients_but_gate_gradient_with_ste():
    layer = make_layer("dsmoe", 0.5)
    x = torch.randn(1, D_MODEL, dtype=torch.float64)
    g = torch.sigmoid(layer.router(x))[0]
    inactive = (g <= 0.5).nonzero().flatten().tolist()
    assert inactive, "seed should give at least one inactive expert"
    layer(x).sum().backward()
    m = D_FF // N
    for i in inactive:
        assert torch.all(layer.gate_proj.weight.grad[i * m : (i + 1) * m] == 0)  # eq. 9 / 14
        assert torch.all(layer.down_proj.weight.grad[:, i * m : (i + 1) * m] == 0)  # eq. 13
        assert layer.router.weight.grad[i].abs().sum() > 0  # eq. 16


def test_sparsity_loss_is_eq19_and_reaches_router():
    layer = make_layer("dsmoe", 0.5)
    model = nn.Sequential(layer)
    x = torch.randn(10, D_MODEL, dtype=torch.float64)
    model(x)
    g = torch.sigmoid(x @ layer.router.weight.T)
    expected = (g * (g > 0.5)).sum() / (N * x.shape[0])
    loss = sparsity_loss(model)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    dg = (g > 0.5).double() / (N * x.shape[0]) * g * (1 - g)
    torch.testing.assert_close(layer.router.weight.grad, dg.T @ x)


def test_sparsity_loss_no_gate_uses_soft_gates():
    layer = make_layer("no_gate", 0.5)
    x = torch.randn(10, D_MODEL, dtype=torch.float64)
    layer(x)
    torch.testing.assert_close(sparsity_loss(nn.Sequential(layer)), torch.sigmoid(x @ layer.router.weight.T).mean())


@pytest.mark.parametrize("mlp_cls,cfg_cls", [(LlamaMLP, LlamaConfig), (Qwen2MLP, Qwen2Config)])
def test_partition_with_unit_weights_equals_hf_mlp(mlp_cls, cfg_cls):
    """Eq. 6: summing all experts' outputs reproduces the dense FFN."""
    torch.manual_seed(0)
    mlp = mlp_cls(
        cfg_cls(
            hidden_size=D_MODEL, intermediate_size=D_FF, hidden_act="silu", num_attention_heads=4, num_key_value_heads=2
        )
    )
    x = torch.randn(3, 5, D_MODEL)
    dense = mlp(x)
    layer = DSMoEMLP(swiglu_parts(mlp), DSMoEConfig(num_experts=N))
    out = layer.masked_forward(x.reshape(-1, D_MODEL), torch.ones(15, N)).reshape_as(dense)
    torch.testing.assert_close(out, dense, rtol=1e-6, atol=1e-6)


def test_sparse_path_equals_masked_path():
    layer = make_layer("dsmoe", 0.5).float().eval()
    x = torch.randn(4, 9, D_MODEL)
    sparse = layer(x)
    layer.inference_impl = "masked"
    torch.testing.assert_close(sparse, layer(x), rtol=1e-5, atol=1e-6)


def test_eval_accumulates_active_counts():
    layer = make_layer("dsmoe", 0.5).eval()
    x = torch.randn(7, D_MODEL, dtype=torch.float64)
    layer(x)
    layer(x)
    active = (torch.sigmoid(x @ layer.router.weight.T) > 0.5).double().sum(0)
    assert layer.expert_tokens == (2 * active).tolist()
    assert layer.tokens_seen == 14


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="num_experts"):
        DSMoEConfig(num_experts=0)
    with pytest.raises(ValueError, match="tau"):
        DSMoEConfig(tau=1.5)
    with pytest.raises(ValueError, match="variant.*'top2'"):
        DSMoEConfig(variant="top2")
    with pytest.raises(ValueError, match="sparsity_weight"):
        DSMoEConfig(sparsity_weight=-1)
    with pytest.raises(ValueError, match="D=32 is not divisible by num_experts=5"):
        DSMoEMLP(
            SwiGLUParts(nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16), nn.SiLU()), DSMoEConfig(num_experts=5)
        )


def test_without_rescale_eval_output_is_the_plain_gated_sum():
    """set_rescale(model, False) (Fig. 2's second curve): h = Σ_active o_i·g_i, eq. 8's n/#active left out."""
    from dsmoe.convert import set_rescale

    layer = make_layer("no_gate", 0.5).eval()
    x = torch.randn(7, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        rescaled = reference_forward(layer, x, training=False)
        set_rescale(nn.Sequential(layer), False)
        plain = layer(x)
    g = torch.sigmoid(x @ layer.router.weight.T)
    k = (g > 0.5).sum(-1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(plain * N / k, rescaled)
    assert not torch.allclose(plain, rescaled)


def test_zero_active_token_gates_learn_with_slope_n():
    """The paper leaves k = 0 undefined: such a token outputs 0 and, under S(x), each gate's gradient is
    n·(c·o_i)·σ'(x·Y_i)·x — the factor n where a token with k active experts has n/k."""
    layer = make_layer("dsmoe", 0.5).train()
    with torch.no_grad():
        layer.router.weight.fill_(0).add_(-5.0)  # every gate ≈ σ(-5·Σx): make them all inactive below
    x = torch.rand(1, D_MODEL, dtype=torch.float64) + 0.1  # positive: x·Y_i < 0, g_i < 0.5
    c = torch.randn(1, D_MODEL, dtype=torch.float64)
    out = layer(x)
    assert layer.last_active.sum() == 0 and torch.equal(out, torch.zeros_like(out))
    (out * c).sum().backward()
    expected = hand_gradients(layer, x, c, training=True)["Y"]
    torch.testing.assert_close(layer.router.weight.grad, expected)
    W, U, V = layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight
    m, g = D_FF // N, torch.sigmoid(layer.router.weight @ x[0])
    s = slice(0, m)
    o0 = (F.silu(W[s] @ x[0]) * (U[s] @ x[0])) @ V[:, s].T
    slope_n = N * (c[0] @ o0) * g[0] * (1 - g[0]) * x[0]
    torch.testing.assert_close(layer.router.weight.grad[0], slope_n.detach())


def test_sparsity_loss_averages_over_layers_eq19():
    """Eq. 19's 1/L: two layers at different gate levels (with one layer a sum and a mean agree)."""
    first = dsmoe_layer(D_MODEL, D_FF, DSMoEConfig(N, 0.5), 0, 1.0).double()
    second = dsmoe_layer(D_MODEL, D_FF, DSMoEConfig(N, 0.5), 1, 3.0).double()
    x = torch.randn(10, D_MODEL, dtype=torch.float64)
    h = first(x)
    second(h)
    g1, g2 = torch.sigmoid(x @ first.router.weight.T), torch.sigmoid(h.detach() @ second.router.weight.T)
    expected = ((g1 * (g1 > 0.5)).sum() + (g2 * (g2 > 0.5)).sum()) / (2 * N * x.shape[0])
    torch.testing.assert_close(sparsity_loss(nn.Sequential(first, second)), expected)


def test_sparsity_loss_of_no_gate_in_eval_is_thresholded():
    layer = dsmoe_layer(D_MODEL, D_FF, DSMoEConfig(N, 0.5, "no_gate"), 0, 1.0).double().eval()
    x = torch.randn(10, D_MODEL, dtype=torch.float64)
    layer(x)
    g = torch.sigmoid(x @ layer.router.weight.T)
    torch.testing.assert_close(sparsity_loss(nn.Sequential(layer)), (g * (g > 0.5)).mean())


def test_a_gate_exactly_at_tau_is_inactive_in_every_path():
    """Eq. 7 is strict: σ(0) = 0.5 = τ (a zero input's gate, at the default τ) switches the expert off in training,
    masked, sparse and decode (batch 1) evaluation alike."""
    layer = dsmoe_layer(D_MODEL, D_FF, DSMoEConfig(N, 0.5), 0, 1.0)
    x = torch.zeros(1, D_MODEL)
    x[0, 0] = 1.0  # the experts' outputs are not 0
    with torch.no_grad():
        layer.router.weight[:, 0] = 0.0  # x·Y_i = 0 exactly
    assert torch.all(layer.gates(x) == 0.5) and layer.masked_forward(x, torch.ones(1, N)).abs().sum() > 0
    for training, impl in ((True, "auto"), (False, "masked"), (False, "sparse")):
        layer.train(training)
        layer.inference_impl = impl
        for batch in (x, torch.cat([x, x])):
            out = layer(batch)
            assert not layer.last_active.any(), (training, impl)
            assert torch.all(out == 0)


def test_the_gates_of_a_bf16_layer_are_an_fp32_sigmoid():
    """Thresholds near τ decide in fp32 whatever the weights' dtype."""
    layer = dsmoe_layer(D_MODEL, D_FF, DSMoEConfig(N, 0.5), 0, 1.0).to(torch.bfloat16)
    x = torch.randn(5, D_MODEL, dtype=torch.bfloat16)
    gates = layer.gates(x)
    assert gates.dtype == torch.float32
    torch.testing.assert_close(gates, torch.sigmoid(layer.router(x).float()), rtol=0, atol=0)


def test_mean_active_experts_is_the_mean_over_layers():
    from dsmoe.stats import ActivationStats

    stats = ActivationStats(8, [1.0, 3.0], [1.0, 3.0], [[0.0] * 8] * 2, 10, 100, 50.0)
    assert stats.mean_active == 2.0
