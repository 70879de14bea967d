"""The interface every method implements, and the dense model as the simplest method.

A :class:`Method` is the only place where methods differ: it turns a dense pre-trained model into the model to
train (DSMoE conversion, top-k MoE, pruning), names its auxiliary losses, acts after each optimizer step (e.g.
keeping pruning masks), reports its activated parameters per token, recognises its saved directories, describes
its configuration for Table 1, matches its knob to a target of activated parameters, plans its structure without
weights, and says whether its activation depends on the input (:class:`DynamicActivation`). The training loop,
the experiment driver and the planner only call these hooks; none of them branches on a method's name.

Each method lives in its own file (``dsmoe/convert.py`` for DSMoE, ``dsmoe/baselines/*.py``); the registry that
imports them all is :mod:`dsmoe.methods`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from dsmoe.matching import Match
from dsmoe.stats import ActivationStats, ParamCounts, count_params

Batches = Iterable[torch.Tensor]  # calibration input_ids batches, for methods that need data


@dataclass(frozen=True)
class DynamicActivation:
    """How a method whose active parameters depend on the token (DSMoE's thresholded gates) measures them.

    reset(model) zeroes the eval-mode counters; stats(model, last, params) reads them (``last``: the last forward
    only, as in training); merge(model, replicas) adds the counters of data-parallel replicas; all_reduce(model)
    replaces them by their sums over all processes; count_only(model, rows) makes the next forwards count only the
    positions where rows (bool [batch, seq]) is True (None: all), so a padded batch's padding is not counted;
    set_threshold / set_rescale / threshold re-set or read the activation knobs at inference (Table 4, Fig. 2)."""

    reset: Callable[[nn.Module], None]
    stats: Callable[[nn.Module, bool, ParamCounts | None], ActivationStats]
    merge: Callable[[nn.Module, list[nn.Module]], None]
    all_reduce: Callable[[nn.Module], None]
    count_only: Callable[[nn.Module, torch.Tensor | None], None]
    set_threshold: Callable[[nn.Module, float], None]
    set_rescale: Callable[[nn.Module, bool], None]
    threshold: Callable[[nn.Module], float]


@dataclass(frozen=True)
class Method:
    """name; apply(model, options, calib_batches) -> model; aux_losses(model) -> {name: weighted loss};
    activated_params(model) -> params per token (for a dynamic method: with every expert on); save(model, dir,
    tokenizer) -> dir; load(dir) -> model; recognises(config.json as a dict) -> whether this method saved it;
    describe(model) -> Table 1's Configuration; match(dense, target, options) -> the options that activate
    ``target`` params (None: the method's activation is not set but learned, or fixed); structure(meta dense model,
    options) -> (params of the prepared model, its setting), for the disk plan, on the meta device;
    on_train_start(model) once the Trainer has wrapped (possibly sharded) the model; before_optimizer_step(model)
    once the gradients are accumulated, before they are clipped; after_optimizer_step(model);
    dynamic: how activation is measured when it depends on the input (None: fixed once applied);
    check_options(options, matched) -> None: a ValueError naming an unknown or invalid option, before any model is
    loaded (``matched``: match will set some options from match_activated, so they may still be missing);
    experts(options) -> n, the slices of the dense SwiGLU FFN its experts are (eq. 6; None: it does not cut the FFN),
    for the checks of the model's config before a run starts."""

    name: str
    apply: Callable[[PreTrainedModel, dict[str, Any], Batches | None], PreTrainedModel]
    aux_losses: Callable[[nn.Module], dict[str, torch.Tensor]]
    activated_params: Callable[[nn.Module], float]
    save: Callable[[nn.Module, Path, Any], Path]
    load: Callable[[Path], nn.Module]
    recognises: Callable[[dict[str, Any]], bool]
    describe: Callable[[nn.Module], str]
    match: Callable[[nn.Module, float, dict[str, Any]], Match] | None = None
    structure: Callable[[PreTrainedModel, dict[str, Any]], tuple[int, str]] | None = None
    after_optimizer_step: Callable[[nn.Module], None] | None = None
    before_optimizer_step: Callable[[nn.Module], None] | None = None
    needs_calibration: bool = False
    on_train_start: Callable[[nn.Module], None] | None = None
    dynamic: DynamicActivation | None = None
    check_options: Callable[[dict[str, Any], bool], None] = lambda options, matched: None
    experts: Callable[[dict[str, Any]], int] | None = None

    def planned_structure(self, dense: PreTrainedModel, options: dict[str, Any]) -> tuple[int, str]:
        """Parameters and setting of the model ``apply`` would build from ``dense`` (a model on the meta device)."""
        if self.structure is not None:
            return self.structure(dense, options)
        with torch.device("meta"):
            model = self.apply(dense, options, None)
        return count_params(model), ", ".join(f"{k}={v}" for k, v in options.items())


def no_aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    return {}


def all_params(model: nn.Module) -> float:
    """Activated params of a model that uses every parameter for every token."""
    return float(count_params(model))


def ffn_widths(model: nn.Module) -> list[int]:
    """The FFN intermediate width D of every decoder layer."""
    return [layer.mlp.down_proj.in_features for layer in model.model.layers]


def describe_dense(model: nn.Module) -> str:
    """Table 1's Configuration of a model with plain FFNs: d and the mean FFN width D over layers."""
    widths = ffn_widths(model)
    return f"d={model.config.hidden_size}, D={sum(widths) / len(widths):g}"


def save_pretrained(model: nn.Module, directory: Path, tokenizer: Any = None) -> Path:
    """Plain HF save (for methods whose model transformers can rebuild from config.json)."""
    from dsmoe.saving import save_hf

    return save_hf(model, directory, tokenizer)


def from_pretrained(directory: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory)


def _dense_options(options: dict[str, Any], matched: bool = False) -> None:
    if options:
        raise ValueError(f"method 'dense' takes no options, got {sorted(options)}")


def _dense_apply(model: PreTrainedModel, options: dict[str, Any], calib: Batches | None) -> PreTrainedModel:
    _dense_options(options)
    return model


DENSE = Method(
    "dense",
    _dense_apply,
    no_aux_losses,
    all_params,
    save_pretrained,
    from_pretrained,
    recognises=lambda config: True,  # the registry asks every other method first
    describe=describe_dense,
    check_options=_dense_options,
)
