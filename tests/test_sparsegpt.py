"""SparseGPT against a naive OBS reference with explicit inverses, magnitude pruning, and the sequential calibration."""

import copy

import pytest
import torch
from torch import nn

from dsmoe.baselines import sparsegpt as sg
from dsmoe.baselines.sparsegpt import SPARSEGPT, prune_weight, pruned_count_for
from dsmoe.models import tiny_model
from dsmoe.stats import count_params


def correlated_inputs(tokens, features, seed=0):
    """Inputs with correlated features and very different scales (where OBS beats magnitude)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5 + torch.eye(features)
    scales = torch.logspace(-1, 1, features)[torch.randperm(features, generator=g)]
    return (torch.randn(tokens, features, generator=g) @ mix) * scales


def hessian(x):
    return 2 * x.T @ x / x.shape[0]


def reference_obs(W, H, sparsity, blocksize, percdamp=0.01):
    """Column-by-column OBS with explicit (H_{j:,j:})⁻¹: saliency w²/[H⁻¹]_00 chosen per block, every
    pruned weight's error -w/[H⁻¹]_00 · [H⁻¹]_{0,:} applied to all later columns at once (no lazy batching)."""
    W, H = W.double().clone(), H.double().clone()
    H += percdamp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    rows, cols = W.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        block = range(i1, min(i1 + blocksize, cols))
        saliency = torch.stack([W[:, j] ** 2 / torch.linalg.inv(H[j:, j:])[0, 0] for j in block], 1)
        n_prune = round(saliency.numel() * sparsity)
        mask = torch.zeros_like(saliency, dtype=torch.bool)
        mask.view(-1)[saliency.flatten().argsort()[:n_prune]] = True
        for c, j in enumerate(block):
            Hinv = torch.linalg.inv(H[j:, j:])
            err = torch.where(mask[:, c], W[:, j], 0.0) / Hinv[0, 0]
            W[:, j:] -= err[:, None] * Hinv[0][None, :]
            W[mask[:, c], j] = 0.0
        pruned[:, i1 : i1 + len(block)] = mask
    return W, pruned


def test_fast_prune_matches_naive_obs_reference():
    torch.manual_seed(0)
    W = torch.randn(12, 24)
    H = hessian(correlated_inputs(300, 24))
    fast, fast_mask = prune_weight(W, H, 0.5, blocksize=8)
    ref, ref_mask = reference_obs(W, H, 0.5, blocksize=8)
    assert torch.equal(fast_mask, ref_mask)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-4, atol=1e-4)
    assert torch.all(fast[fast_mask] == 0)
    # exact sparsity per block of columns
    assert [int(fast_mask[:, i : i + 8].sum()) for i in (0, 8, 16)] == [48, 48, 48]


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_reconstruction_beats_magnitude_pruning(sparsity):
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    X = correlated_inputs(512, 64, seed=1)
    pruned, mask = prune_weight(W, hessian(X), sparsity, blocksize=16)
    magnitude = W.clone()
    magnitude.view(-1)[W.abs().flatten().argsort()[: int(mask.sum())]] = 0  # same number of zeros
    err_sparsegpt = torch.linalg.norm(X @ (W - pruned).T)
    err_magnitude = torch.linalg.norm(X @ (W - magnitude).T)
    assert (pruned == 0).sum() == (magnitude == 0).sum()
    assert err_sparsegpt < 0.7 * err_magnitude


def test_zero_sparsity_keeps_weights():
    W = torch.randn(8, 16)
    out, mask = prune_weight(W, hessian(correlated_inputs(64, 16)), 0.0, blocksize=4)
    assert not mask.any()
    torch.testing.assert_close(out, W)


def test_dead_inputs_do_not_break_cholesky():
    X = correlated_inputs(64, 16)
    X[:, 3] = 0
    out, mask = prune_weight(torch.randn(8, 16), hessian(X), 0.5)
    assert torch.isfinite(out).all() and int(mask.sum()) == 64


def calib(seed=0, batches=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 16), generator=g) for _ in range(batches)]


def test_layer_inputs_come_from_already_pruned_layers(monkeypatch):
    """The Hessian of layer l's Linears is built from inputs produced by the pruned layers < l (and a dense layer l)."""
    dense = tiny_model("llama").eval()
    seen = []
    real = sg.prune_weight
    monkeypatch.setattr(sg, "prune_weight", lambda w, h, *a: seen.append(h.clone()) or real(w, h, *a))
    pruned = SPARSEGPT.apply(copy.deepcopy(dense), {"sparsity": 0.5}, calib())
    per_layer = len([m for m in dense.model.layers[0].modules() if isinstance(m, nn.Linear)])
    assert len(seen) == per_layer * len(dense.model.layers)
    for idx, dense_layer in enumerate(dense.model.layers):
        hybrid = copy.deepcopy(pruned)
        hybrid.model.layers[idx].load_state_dict(dense_layer.state_dict())
        linears = [m for m in hybrid.model.layers[idx].modules() if isinstance(m, nn.Linear)]
        xs = {id(m): [] for m in linears}
        for m in linears:
            m.register_forward_hook(
                lambda mod, args, out, xs=xs: xs[id(mod)].append(args[0].reshape(-1, args[0].shape[-1]))
            )
        with torch.no_grad():
            for batch in calib():
                hybrid(input_ids=batch)
        for i, m in enumerate(linears):
            torch.testing.assert_close(seen[idx * per_layer + i], hessian(torch.cat(xs[id(m)])), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_masks_survive_adamw_steps_and_accounting(arch):
    torch.manual_seed(0)
    model = SPARSEGPT.apply(tiny_model(arch), {"sparsity": 0.6}, calib())
    linears = [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 14 and len(sg.masked_linears(model)) == 14
    expected_pruned = sum(pruned_count_for(tuple(m.weight.shape), 0.6, 128) for m in linears)
    assert sum(int((m.weight == 0).sum()) for m in linears) == expected_pruned == model.config.sparsegpt["pruned"]
    assert SPARSEGPT.activated_params(model) == count_params(model) - expected_pruned
    assert model.lm_head.weight.ne(0).all() and model.model.embed_tokens.weight.ne(0).all()

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = {id(m): m.weight.detach().clone() for m in linears}
    ids = torch.randint(0, 256, (2, 12))
    for step in range(3):
        loss = model(input_ids=ids, labels=ids).loss + sum(SPARSEGPT.aux_losses(model).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:  # the optimizer does move pruned weights: the hook is what keeps them at zero
            assert any(m.weight[getattr(m, sg.MASK)].ne(0).any() for m in linears)
        SPARSEGPT.after_optimizer_step(model)
    for m in linears:
        mask = getattr(m, sg.MASK)
        assert torch.all(m.weight[mask] == 0)
        assert not torch.equal(m.weight[~mask], before[id(m)][~mask])  # kept weights still train
    assert SPARSEGPT.activated_params(model) == count_params(model) - expected_pruned


def test_save_load_keeps_masks(tmp_path):
    model = SPARSEGPT.apply(tiny_model("llama"), {"sparsity": 0.5}, calib()).eval()
    ids = torch.randint(0, 256, (2, 10))
    SPARSEGPT.save(model, tmp_path, None)
    loaded = SPARSEGPT.load(tmp_path).eval()
    a, b = sg.masked_linears(model), sg.masked_linears(loaded)
    assert len(a) == len(b) == 14
    for x, y in zip(a, b, strict=True):
        assert torch.equal(getattr(x, sg.MASK), getattr(y, sg.MASK))
    assert SPARSEGPT.activated_params(loaded) == SPARSEGPT.activated_params(model)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_lost_masks_are_detected(tmp_path):
    model = SPARSEGPT.apply(tiny_model("llama"), {"sparsity": 0.5}, calib())
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(1.0)  # a "training" step without the mask hook
    SPARSEGPT.save(model, tmp_path, None)
    with pytest.raises(ValueError, match="masks were lost"):
        SPARSEGPT.load(tmp_path)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="needs calibration"):
        SPARSEGPT.apply(tiny_model("llama"), {"sparsity": 0.5}, None)
    with pytest.raises(ValueError, match="sparsity must lie in"):
        SPARSEGPT.apply(tiny_model("llama"), {"sparsity": 1.0}, calib())
    with pytest.raises(ValueError, match="batches were empty"):
        SPARSEGPT.apply(tiny_model("llama"), {"sparsity": 0.5}, [])
