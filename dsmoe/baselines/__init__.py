"""Baselines of Tables 1-2, each a dsmoe.methods.Method: LLaMA-MoE top-k MoE, SparseGPT, LLM-Pruner
(channel, block), plus matching to a target activated-parameter count."""

from dsmoe.baselines.matching import Match, match_llm_pruner, match_options, match_sparsegpt, match_topk_moe
from dsmoe.baselines.sparsegpt import SPARSEGPT, SparseGPTConfig, load_sparsegpt, restore_masks, sparsegpt_prune
from dsmoe.baselines.topk_moe import (
    TOPK_MOE,
    TopKMoEConfig,
    TopKMoEMLP,
    convert_to_topk_moe,
    load_topk_moe,
    save_topk_moe,
)

__all__ = [
    "SPARSEGPT",
    "TOPK_MOE",
    "Match",
    "SparseGPTConfig",
    "TopKMoEConfig",
    "TopKMoEMLP",
    "convert_to_topk_moe",
    "load_sparsegpt",
    "load_topk_moe",
    "match_llm_pruner",
    "match_options",
    "match_sparsegpt",
    "match_topk_moe",
    "restore_masks",
    "save_topk_moe",
    "sparsegpt_prune",
]
