"""Configurations of saved DSMoE, LLaMA-MoE and LLM-Pruner models (HF remote code: torch and transformers only).

A saved model's config.json is its base architecture's (llama, qwen2 or mistral) with ``model_type`` set to
the method's ("dsmoe", "dsmoe_llama_moe", "dsmoe_llm_pruner": unknown to transformers, so that loading it
needs ``trust_remote_code=True`` instead of silently giving a dense model), the base's type in
``base_model_type``, the method's entry ("dsmoe", "llama_moe", "llm_pruner") and an ``auto_map`` to the
classes below. Each class is the base's config class with the method's model_type.
"""

from __future__ import annotations

import transformers

if int(transformers.__version__.split(".")[0]) < 5:  # before the names below are imported: say why, not which
    raise ImportError(
        f"this model's remote code needs transformers >= 5 (found {transformers.__version__}): its config.json keeps "
        "RoPE's settings under rope_parameters, which transformers 4 would not read, giving a silently wrong model; "
        "pip install 'transformers>=5.23,<6'"
    )

from transformers import LlamaConfig, MistralConfig, PreTrainedConfig, Qwen2Config  # noqa: E402

# base model_type -> (class name part, config class)
BASES: dict[str, tuple[str, type[PreTrainedConfig]]] = {
    "llama": ("Llama", LlamaConfig),
    "qwen2": ("Qwen2", Qwen2Config),
    "mistral": ("Mistral", MistralConfig),
}
# method model_type -> (class name part, the config.json entry holding the method's settings)
METHODS: dict[str, tuple[str, str]] = {
    "dsmoe": ("DSMoE", "dsmoe"),
    "dsmoe_llama_moe": ("LlamaMoE", "llama_moe"),
    "dsmoe_llm_pruner": ("LLMPruner", "llm_pruner"),
}


def class_name(model_type: str, base_model_type: str, kind: str) -> str:
    """Name of the remote class ("Config" or "ForCausalLM" kind) of a method on a base architecture."""
    if model_type not in METHODS:
        raise ValueError(f"unknown method model_type {model_type!r}; known: {sorted(METHODS)}")
    if base_model_type not in BASES:
        raise ValueError(
            f"a {model_type!r} model on a {base_model_type!r} base cannot be saved as HF remote code; "
            f"supported base architectures: {sorted(BASES)}"
        )
    return METHODS[model_type][0] + BASES[base_model_type][0] + kind


def _config_class(model_type: str, base_model_type: str) -> type[PreTrainedConfig]:
    base = BASES[base_model_type][1]
    doc = f"{base.__name__} of a {model_type!r} model (settings in config.{METHODS[model_type][1]})."
    attrs = {"model_type": model_type, "base_model_type": base_model_type, "__module__": __name__, "__doc__": doc}
    return type(class_name(model_type, base_model_type, "Config"), (base,), attrs)


CONFIG_CLASSES = {(m, b): _config_class(m, b) for m in METHODS for b in BASES}
# the names config.json's auto_map refers to: DSMoELlamaConfig, LlamaMoEQwen2Config, ... (see class_name)
globals().update({cls.__name__: cls for cls in CONFIG_CLASSES.values()})
