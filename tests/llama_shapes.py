"""Llama-family shapes and their parameter counts in closed form, written from the shapes alone (no dsmoe code):
the independent reference that the baselines' counts, plans and pruned models are checked against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel


@dataclass(frozen=True)
class LlamaShape:
    """A decoder of ``layers`` blocks: RMSNorm, attention (``heads`` query heads in ``kv_heads`` groups of
    ``head_dim``), RMSNorm, SwiGLU FFN of width ``intermediate``; an embedding, a final norm and an lm_head."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool = False

    def params(
        self,
        hidden: int | None = None,
        intermediate: Sequence[int] | None = None,
        kv_heads: Sequence[int] | None = None,
    ) -> int:
        """Parameters with hidden size d (channel pruning) and per-layer FFN widths / KV-group counts (block
        pruning; a KV group keeps its heads/kv_heads query heads): V·d (·2 untied) + d + Σ_layers [2d +
        d·(q + 2k) + q·d + 3·d·D (+ q + 2k biases)], q = query heads·head_dim, k = KV heads·head_dim."""
        d = self.hidden if hidden is None else hidden
        ffn = [self.intermediate] * self.layers if intermediate is None else list(intermediate)
        groups = [self.kv_heads] * self.layers if kv_heads is None else list(kv_heads)
        total = self.vocab * d * (1 if self.tied else 2) + d
        for width, g in zip(ffn, groups, strict=True):
            q, k = g * (self.heads // self.kv_heads) * self.head_dim, g * self.head_dim
            total += 2 * d + d * (q + 2 * k) + q * d + 3 * d * width + ((q + 2 * k) if self.qkv_bias else 0)
        return total

    def ffn_params(self) -> int:
        """gate, up and down projections of all layers: L·3·d·D."""
        return self.layers * 3 * self.hidden * self.intermediate

    def meta_model(self) -> PreTrainedModel:
        """The model built on the meta device: real module shapes, no memory."""
        config = LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            intermediate_size=self.intermediate,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            tie_word_embeddings=self.tied,
            attention_bias=self.qkv_bias,
        )
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)


# tiny_models.tiny_model: d=64, D=128, 2 layers, 4 heads of 16 in 2 KV groups, vocab 256; Qwen2 adds q/k/v biases
TINY_LLAMA = LlamaShape(vocab=256, hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, head_dim=16, tied=False)
# Llama-3.2-1B (the paper's LLaMA-1B, tied embeddings) and LLaMA-7B (untied), from their config.json
LLAMA_1B = LlamaShape(128256, 2048, 16, 8192, heads=32, kv_heads=8, head_dim=64, tied=True)
LLAMA_7B = LlamaShape(32000, 4096, 32, 11008, heads=32, kv_heads=32, head_dim=128, tied=False)
