"""Tiny models, DSMoE layers, word-level tokenizers and token batches that the fast tests build on."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.activations import ACT2FN

from dsmoe import DSMoEConfig, DSMoEMLP
from dsmoe.hf_remote.partitioned_swiglu import SwiGLUParts

TINY_ARCHS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
TINY_VOCAB = 256


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> PreTrainedModel:
    """A randomly initialised tiny Llama / Qwen2 / Mistral (2 layers, d=64, D=128; its shape: llama_shapes.TINY_LLAMA)."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(TINY_ARCHS)}")
    params = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    params.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(TINY_ARCHS[arch](**params), dtype=torch.float32)


def dsmoe_layer(
    d_model: int, d_ff: int, config: DSMoEConfig, seed: int = 0, router_std: float = 1.0, bias: bool = False
) -> DSMoEMLP:
    """A DSMoE layer over freshly initialised SwiGLU projections (gate, up, down, seeded), router ~ N(0, router_std²)."""
    torch.manual_seed(seed)
    gate, up = nn.Linear(d_model, d_ff, bias=bias), nn.Linear(d_model, d_ff, bias=bias)
    down = nn.Linear(d_ff, d_model, bias=bias)
    layer = DSMoEMLP(SwiGLUParts(gate, up, down, ACT2FN["silu"]), config)
    nn.init.normal_(layer.router.weight, std=router_std)
    return layer


def word_tokenizer(words, eos="<eos>", extra=()) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: one token per word, so token counts are checkable by hand."""
    vocab = {tok: i for i, tok in enumerate([eos, "<unk>", *extra, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, unk_token="<unk>")


def calib(n: int = 2, seed: int = 1, length: int = 12) -> list[torch.Tensor]:
    """``n`` seeded calibration batches of 2 sequences of ``length`` token ids of the tiny vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY_VOCAB, (2, length), generator=g) for _ in range(n)]
