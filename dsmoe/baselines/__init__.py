"""Baselines of Tables 1-2, each a dsmoe.method.Method in its own file: LLaMA-MoE top-k MoE, SparseGPT, LLM-Pruner
(channel, block), each with its matching to a target activated-parameter count."""

from dsmoe.baselines.llama_moe import (
    LLAMA_MOE,
    LlamaMoEConfig,
    LlamaMoEMLP,
    convert_to_llama_moe,
    load_llama_moe,
    match_llama_moe,
    save_llama_moe,
)
from dsmoe.baselines.llm_pruner import LLM_PRUNER_BLOCK, LLM_PRUNER_CHANNEL, match_llm_pruner
from dsmoe.baselines.sparsegpt import (
    SPARSEGPT,
    SparseGPTConfig,
    load_sparsegpt,
    match_sparsegpt,
    restore_masks,
    sparsegpt_prune,
)

__all__ = [
    "LLAMA_MOE",
    "LLM_PRUNER_BLOCK",
    "LLM_PRUNER_CHANNEL",
    "SPARSEGPT",
    "LlamaMoEConfig",
    "LlamaMoEMLP",
    "SparseGPTConfig",
    "convert_to_llama_moe",
    "load_llama_moe",
    "load_sparsegpt",
    "match_llama_moe",
    "match_llm_pruner",
    "match_sparsegpt",
    "restore_masks",
    "save_llama_moe",
    "sparsegpt_prune",
]
