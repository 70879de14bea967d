"""SparseGPT baseline (Frantar & Alistarh, 2023): one-shot unstructured pruning by layer-wise OBS reconstruction.

Every nn.Linear inside the decoder layers (q/k/v/o and gate/up/down; not embeddings or lm_head) is pruned
to a sparsity s while its remaining weights are updated to minimise ||W·X − Ŵ·X||², using the layer
Hessian H = 2·X·Xᵀ/N of calibration inputs. Layers are processed in order and the inputs of layer l come
from the already pruned layers < l (as IST-DASLab/sparsegpt's ``llama_sequential``).

Masks live as non-persistent bool buffers ``sparsegpt_pruned`` on the pruned Linears (they count the activated
params). For continued pre-training the pruned set is taken again from the weights' zeros once the Trainer has
wrapped the model — under FSDP each process then holds the mask of its own shard, whatever FSDP's flattening —
and re-applied after every optimizer step, so pruned weights stay exactly zero. Saving
writes the zeros through ``save_pretrained``; :func:`load_sparsegpt` (or :func:`restore_masks` after any
``from_pretrained``) rebuilds the masks from those zeros and checks them against the pruned count recorded
in ``config.json`` (entry "sparsegpt").

Saved as a plain dense HF model on purpose: the pruned weights are zeros, so plain transformers (lm-eval, any HF
tool) opens it as exactly the pruned model; the masks only matter for continued training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from dsmoe.config_checks import options_check
from dsmoe.matching import Match, resolve_target
from dsmoe.method import Batches, Method, describe_dense, no_aux_losses, save_pretrained
from dsmoe.stats import count_params

MASK = "sparsegpt_pruned"  # buffer name: True where the weight is pruned


@dataclass
class SparseGPTConfig:
    """sparsity: fraction of every decoder Linear's weights set to zero (exact per block of columns).
    blocksize: columns per lazy batch update and per adaptive mask selection (original: 128).
    percdamp: dampening λ = percdamp · mean(diag H) added to H's diagonal (original: 0.01).
    """

    sparsity: float = 0.5
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity!r}")
        if not isinstance(self.blocksize, int) or isinstance(self.blocksize, bool) or self.blocksize < 1:
            raise ValueError(f"blocksize must be a positive integer, got {self.blocksize!r}")
        if float(self.percdamp) <= 0:
            raise ValueError(f"percdamp must be > 0 (H must stay positive definite), got {self.percdamp!r}")


def block_prune_count(numel: int, sparsity: float) -> int:
    """Weights pruned in one block of ``numel`` weights: round(s·numel), the paper's p%. (IST-DASLab's fasterprune
    prunes ``tmp <= sort(tmp)[int(n·s)]``, i.e. int(n·s) + 1; the difference is at most one weight per block.)"""
    return int(numel * sparsity + 0.5)


def pruned_count_for(shape: tuple[int, int], sparsity: float, blocksize: int) -> int:
    """Weights :func:`prune_weight` removes from a [rows, cols] matrix."""
    rows, cols = shape
    return sum(block_prune_count(rows * min(blocksize, cols - i), sparsity) for i in range(0, cols, blocksize))


@torch.no_grad()
def prune_weight(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, blocksize: int = 128, percdamp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's fast OBS reconstruction (Frantar & Alistarh 2023, Alg. 1): returns (Ŵ, pruned mask).

    Columns are eliminated left to right with the upper Cholesky factor U of H⁻¹ (row i of U is the
    scaled first row of (H_{i:,i:})⁻¹). Per block of ``blocksize`` columns the pruned set is chosen
    adaptively as the ``sparsity`` fraction with the smallest saliency w²/U_ii²; each pruned weight's
    error (w − 0)/U_ii is propagated to the later columns of the block at once and to the remaining
    columns lazily after the block. Computed in fp32.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(
            f"hessian must be [{cols}, {cols}] for a weight of shape {tuple(W.shape)}, got {tuple(H.shape)}"
        )
    dead = H.diagonal() == 0  # inputs that are always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]  # W1 is a view: updated in place
        d = U1.diagonal()
        saliency = (W1 / d) ** 2
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        n_prune = block_prune_count(W1.numel(), sparsity)
        mask1.view(-1)[saliency.flatten().topk(n_prune, largest=False).indices] = True
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            err = torch.where(mask1[:, i], w, 0.0) / d[i]
            W1[:, i + 1 :] -= err.unsqueeze(1) * U1[i, i + 1 :].unsqueeze(0)
            w.masked_fill_(mask1[:, i], 0.0)
            err1[:, i] = err
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
        pruned[:, i1:i2] = mask1
    return W.to(weight.dtype), pruned


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-family causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers ModuleList; SparseGPT supports Llama-family LMs")
    return layers


class _Captured(Exception):
    pass


def _capture_first_layer_inputs(model: nn.Module, batches: Batches) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """(hidden_states, kwargs) that each calibration batch feeds into decoder layer 0."""
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, dict(kwargs)))
        raise _Captured

    device = next(model.parameters()).device
    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            if not isinstance(batch, torch.Tensor) or batch.dim() != 2:
                raise TypeError(
                    f"calibration batches must be [batch, seq] input_ids tensors, got {type(batch).__name__}"
                )
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError("SparseGPT needs calibration data: the calibration batches were empty")
    return captured


def _layer_out(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _Hessian:
    """Forward hook accumulating H = 2·X·Xᵀ/N over the N input rows of a Linear (fp32)."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.xxt = torch.zeros(features, features, device=device)
        self.tokens = 0

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        self.xxt.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.xxt.mul_(2 / max(self.tokens, 1))


def set_mask(linear: nn.Linear, pruned: torch.Tensor, zero: bool = True) -> None:
    """Attach the pruned-weight mask to a Linear and zero those weights (``zero=False``: they are zero already;
    not writing them keeps a memory-mapped weight shared with the other processes that loaded it)."""
    if pruned.shape != linear.weight.shape:
        raise ValueError(f"mask shape {tuple(pruned.shape)} != weight shape {tuple(linear.weight.shape)}")
    linear.register_buffer(MASK, pruned.to(device=linear.weight.device, dtype=torch.bool), persistent=False)
    if zero:
        with torch.no_grad():
            linear.weight.masked_fill_(getattr(linear, MASK), 0)


def masked_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) and hasattr(m, MASK)]


@torch.no_grad()
def sparsegpt_prune(model: PreTrainedModel, batches: Batches, config: SparseGPTConfig) -> PreTrainedModel:
    """Prune every decoder Linear layer by layer with SparseGPT; records ``model.config.sparsegpt``."""
    layers = decoder_layers(model)
    was_training = model.training
    model.eval()
    inputs = _capture_first_layer_inputs(model, batches)
    pruned_total = 0
    for layer in layers:
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        hessians = {name: _Hessian(m.in_features, m.weight.device) for name, m in linears.items()}
        handles = [m.register_forward_hook(hessians[name]) for name, m in linears.items()]
        try:
            for hidden, kwargs in inputs:
                layer(hidden, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for name, linear in linears.items():
            H = hessians.pop(name).value()
            W, pruned = prune_weight(linear.weight, H, config.sparsity, config.blocksize, config.percdamp)
            linear.weight.copy_(W)
            set_mask(linear, pruned)
            pruned_total += int(pruned.sum())
        inputs = [(_layer_out(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
    model.train(was_training)
    model.config.sparsegpt = {**asdict(config), "pruned": pruned_total}
    return model


TRAINING_MASKS = "sparsegpt_training_masks"  # model attribute: [(weight, pruned)] as the weights are held in training


@torch.no_grad()
def take_training_masks(model: nn.Module) -> None:
    """Record, for each pruned Linear, its pruned set as the weight is held now (call before the first step): the
    mask itself for a whole matrix; under FSDP, where a process holds a 1-D shard of the flattened weights, the
    shard's zeros (pruned weights are exactly 0: SparseGPT zeroes them and every step re-zeroes them), and the
    whole-matrix mask is dropped (FSDP moved it to every device unsharded: ~6.5 GB per GPU at 7B). Call it after
    the parameter counts are taken (they read the whole masks)."""
    linears = masked_linears(model)
    if not linears:
        raise ValueError("no SparseGPT masks on this model: prune it with SPARSEGPT.apply or call restore_masks()")
    pairs = []
    for m in linears:
        mask = getattr(m, MASK)
        if mask.shape == m.weight.shape:
            pairs.append((m.weight, mask))
        else:
            pairs.append((m.weight, m.weight == 0))
            del m._buffers[MASK]
    model.__dict__[TRAINING_MASKS] = pairs


def _pruned_pairs(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, pruned) of every pruned Linear: the training masks once taken (shards under FSDP), else the masks."""
    return model.__dict__.get(TRAINING_MASKS) or [(m.weight, getattr(m, MASK)) for m in masked_linears(model)]


@torch.no_grad()
def mask_gradients(model: nn.Module) -> None:
    """Zero the pruned weights' gradients before they are clipped and stepped: the pruned model has no such
    parameters, and their gradients would count in the clipped global norm, shrinking the kept weights' updates."""
    for weight, pruned in _pruned_pairs(model):
        if weight.grad is not None:
            weight.grad.masked_fill_(pruned, 0)


@torch.no_grad()
def enforce_masks(model: nn.Module) -> None:
    """Re-zero the pruned weights after each optimizer step: with their gradients zeroed AdamW leaves them at 0,
    and this keeps them there whatever the optimizer's state (e.g. moments from a checkpoint of an older version)."""
    for weight, pruned in _pruned_pairs(model):
        weight.masked_fill_(pruned, 0)


def pruned_params(model: nn.Module) -> int:
    linears = masked_linears(model)
    if not linears:
        raise ValueError("no SparseGPT masks on this model: prune it with SPARSEGPT.apply or call restore_masks()")
    return sum(int(getattr(m, MASK).sum()) for m in linears)


def activated_params(model: nn.Module) -> float:
    """Total parameters minus pruned weights (how Table 1 counts SparseGPT: 1.24B total, 735M activated)."""
    return float(count_params(model) - pruned_params(model))


def restore_masks(model: PreTrainedModel) -> PreTrainedModel:
    """Rebuild the masks of a pruned model loaded with from_pretrained: pruned = decoder weights that are 0.

    Raises if fewer zeros are found than ``config.sparsegpt["pruned"]`` recorded (the masks were not
    kept during training). A kept weight that became exactly 0 would be counted as pruned (harmless).
    """
    record = getattr(model.config, "sparsegpt", None)
    if record is None:
        raise ValueError("model.config has no 'sparsegpt' entry: it was not pruned with SparseGPT")
    found = 0
    for layer in decoder_layers(model):
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                set_mask(m, m.weight == 0, zero=False)
                found += int(getattr(m, MASK).sum())
    if found < record["pruned"]:
        raise ValueError(f"found {found} zero decoder weights but SparseGPT pruned {record['pruned']}: masks were lost")
    return model


def load_sparsegpt(
    directory: str | Path, dtype: torch.dtype | None = None, **from_pretrained_kwargs
) -> PreTrainedModel:
    """from_pretrained + :func:`restore_masks`, ready for evaluation or continued training."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or "auto", **from_pretrained_kwargs)
    return restore_masks(model)


def match_sparsegpt(model: nn.Module, target: float, blocksize: int = 128) -> Match:
    """SparseGPT's sparsity s over the decoder Linears so that total − pruned ≈ target (exact up to rounding)."""
    goal = resolve_target(model, target)
    total = count_params(model)
    shapes = [tuple(m.weight.shape) for m in decoder_layers(model).modules() if isinstance(m, nn.Linear)]
    prunable = sum(r * c for r, c in shapes)
    sparsity = (total - goal) / prunable
    if not 0 <= sparsity < 1:
        raise ValueError(
            f"target {goal:.0f} needs pruning {total - goal:.0f} weights but the decoder Linears hold {prunable}; "
            f"SparseGPT can reach activated params in ({total - prunable}, {total}]"
        )
    achieved = total - sum(pruned_count_for(s, sparsity, blocksize) for s in shapes)
    return Match("sparsegpt", {"sparsity": sparsity, "blocksize": blocksize}, goal, float(achieved))


def _apply(model: PreTrainedModel, options: dict[str, Any], calib: Batches | None) -> PreTrainedModel:
    if calib is None:
        raise ValueError("method 'sparsegpt' needs calibration batches (input_ids tensors)")
    return sparsegpt_prune(model, calib, SparseGPTConfig(**options))


def _structure(dense: PreTrainedModel, options: dict[str, Any]) -> tuple[int, str]:
    """Pruned weights are stored as zeros: the saved model has every dense parameter."""
    return count_params(dense), f"sparsity={SparseGPTConfig(**options).sparsity:.3f}"


SPARSEGPT = Method(
    "sparsegpt",
    _apply,
    no_aux_losses,
    activated_params,
    save=save_pretrained,  # the zeros are the saved state; load_sparsegpt rebuilds the masks from them
    load=load_sparsegpt,
    recognises=lambda config: "sparsegpt" in config,
    describe=describe_dense,
    match=lambda model, target, options: match_sparsegpt(model, target, options.get("blocksize", 128)),
    structure=_structure,
    after_optimizer_step=enforce_masks,
    before_optimizer_step=mask_gradients,
    needs_calibration=True,
    on_train_start=take_training_masks,
    check_options=options_check(SparseGPTConfig, "sparsegpt"),
)
