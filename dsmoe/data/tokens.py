"""Documents to tokens: the document separator, batched tokenisation, packing into windows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

CHAT_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
DOCUMENT_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def document_separator_id(tokenizer) -> int:
    """The token appended after every document: EOS, unless EOS is a chat end-of-turn marker (the SmolLM2 GGUF
    declares ``<|im_end|>``), in which case the vocabulary's document end token (``<|endoftext|>``) is used."""
    eos = tokenizer.eos_token
    if eos is not None and eos not in CHAT_END_MARKERS and tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    vocab = tokenizer.get_vocab()
    for token in DOCUMENT_END_TOKENS:
        if token in vocab:
            return vocab[token]
    raise ValueError(
        f"tokenizer has EOS {eos!r} (a chat marker or none) and none of {list(DOCUMENT_END_TOKENS)}: "
        "cannot choose a document separator"
    )


def tokenize_documents(tokenizer, texts: Sequence[str], separator_id: int) -> list[list[int]]:
    """Token ids of each text (one tokenizer call for all of them), each followed by the separator."""
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [doc + [separator_id] for doc in ids]


def pack(token_lists: Iterable[list[int]], window: int) -> Iterator[list[int]]:
    """Concatenate and cut into consecutive ``window``-token pieces; only the final partial one is dropped."""
    buffer: list[int] = []
    for tokens in token_lists:
        buffer.extend(tokens)
        start = 0
        while len(buffer) - start >= window:
            yield buffer[start : start + window]
            start += window
        del buffer[:start]


def packed_eval_windows(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Held-out texts as a LongTensor [N, seq_len + 1], packed exactly like training (for PPL evaluation)."""
    docs = tokenize_documents(tokenizer, texts, document_separator_id(tokenizer))
    windows = list(pack(docs, seq_len + 1))
    return torch.tensor(windows, dtype=torch.long).reshape(len(windows), seq_len + 1)


def document_eval_sequences(tokenizer, texts: Sequence[str], seq_len: int) -> list[torch.Tensor]:
    """Held-out documents each as its own sequence (the paper's validation instances, §5.1: at most seq_len
    tokens each): BOS when the tokenizer has one, the document's tokens, cut to seq_len + 1 (the first token is
    context only). Documents under two tokens are left out."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    sequences = [(bos + doc)[: seq_len + 1] for doc in ids]
    return [torch.tensor(seq, dtype=torch.long) for seq in sequences if len(seq) >= 2]
