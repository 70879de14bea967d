"""Causal LMs of saved DSMoE, LLaMA-MoE and LLM-Pruner models (HF remote code: torch and transformers only).

Each class is the base architecture's causal LM (Llama, Qwen2, Mistral) whose FFNs are rebuilt from the
method's config.json entry before the weights are loaded, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` gives the method's model:

- "dsmoe": every SwiGLU FFN becomes a :class:`ThresholdGatedSwiGLU` with the saved n, τ and variant
  (eval: keep expert i iff σ(x·Y_i) > τ, weight G(g)·n/#active, eqs. 7–8);
- "dsmoe_llama_moe": a :class:`TopKGatedSwiGLU` (eval: softmax over the top-k clean gate logits times
  score_scale_factor);
- "dsmoe_llm_pruner": the per-layer shapes of the "llm_pruner" entry (:func:`shrink_to_spec`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, PreTrainedModel, Qwen2ForCausalLM

from .configuration_dsmoe import BASES, CONFIG_CLASSES, METHODS, class_name
from .partitioned_swiglu import ThresholdGatedSwiGLU, TopKGatedSwiGLU, replace_swiglu, swiglu_parts
from .pruned_shapes import shrink_to_spec

BASE_MODELS: dict[str, type[PreTrainedModel]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "mistral": MistralForCausalLM,
}
DSMOE_KEYS = ("num_experts", "tau", "variant")
LLAMA_MOE_KEYS = ("num_experts", "top_k", "score_scale_factor", "noisy_gating", "noise_epsilon", "gate_network")


def method_entry(config: Any, model_type: str) -> dict[str, Any]:
    """The method's settings from config.json (entry "dsmoe", "llama_moe" or "llm_pruner")."""
    key = METHODS[model_type][1]
    entry = getattr(config, key, None)
    if not isinstance(entry, dict):
        raise ValueError(f"the config of a {model_type!r} model needs a {key!r} entry (a dict), got {entry!r}")
    return entry


def _settings(entry: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: entry[k] for k in keys if k in entry}


def to_dsmoe(model: nn.Module, entry: dict[str, Any]) -> None:
    """Every SwiGLU FFN becomes a ThresholdGatedSwiGLU with the entry's n, τ and variant."""
    replace_swiglu(model, lambda ffn: ThresholdGatedSwiGLU(swiglu_parts(ffn), **_settings(entry, DSMOE_KEYS)))


def to_llama_moe(model: nn.Module, entry: dict[str, Any]) -> None:
    """Every SwiGLU FFN becomes a TopKGatedSwiGLU with the entry's n, k, scale and gate network."""
    replace_swiglu(model, lambda ffn: TopKGatedSwiGLU(swiglu_parts(ffn), **_settings(entry, LLAMA_MOE_KEYS)))


TRANSFORMS: dict[str, Callable[[nn.Module, dict[str, Any]], Any]] = {
    "dsmoe": to_dsmoe,
    "dsmoe_llama_moe": to_llama_moe,
    "dsmoe_llm_pruner": shrink_to_spec,
}


def _causal_lm_class(model_type: str, base_model_type: str) -> type[PreTrainedModel]:
    base, transform = BASE_MODELS[base_model_type], TRANSFORMS[model_type]

    def __init__(self, config) -> None:
        base.__init__(self, config)
        transform(self, method_entry(config, model_type))

    name = class_name(model_type, base_model_type, "ForCausalLM")
    attrs = {
        "config_class": CONFIG_CLASSES[model_type, base_model_type],
        "__init__": __init__,
        "__module__": __name__,
        "__doc__": f"{base.__name__} with the structure of a {model_type!r} model.",
    }
    return type(name, (base,), attrs)


CAUSAL_LM_CLASSES = {(m, b): _causal_lm_class(m, b) for m in METHODS for b in BASES}
# the names config.json's auto_map refers to: DSMoELlamaForCausalLM, LlamaMoEQwen2ForCausalLM, ... (see class_name)
globals().update({cls.__name__: cls for cls in CAUSAL_LM_CLASSES.values()})
