"""HF-format save/load shared by every transformed model: dense weights through save_pretrained /
from_pretrained, extra tensors (routers, gates) read back from the same safetensors files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, logging

WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin*")


def save_hf(model: PreTrainedModel, directory: str | Path, tokenizer: Any = None) -> Path:
    """save_pretrained the model (and tokenizer) into directory without leaving half-written files there.

    Everything is written to a temporary sibling directory first, then moved in file by file, config.json
    last (its presence marks a complete save); weight files of an earlier save that the new one does not
    overwrite (other shard counts) are removed. Other files in directory are left alone.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.saving."))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        new = {f.name for f in tmp.iterdir()}
        stale = {f for pattern in WEIGHT_FILES for f in directory.glob(pattern) if f.name not in new}
        (directory / "config.json").unlink(missing_ok=True)  # incomplete until the new one is in place
        for f in stale:
            f.unlink()
        for name in sorted(new - {"config.json"}):
            os.replace(tmp / name, directory / name)
        os.replace(tmp / "config.json", directory / "config.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_tensors(directory: str | Path, keep: Callable[[str], bool] = lambda name: True) -> dict[str, torch.Tensor]:
    """The tensors whose names pass ``keep`` from a (possibly sharded) safetensors checkpoint."""
    from safetensors import safe_open

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(directory / f), framework="pt") as fh:
            state.update({k: fh.get_tensor(k) for k in fh.keys() if keep(k)})
    return state


def saved_entry(directory: str | Path, key: str) -> dict[str, Any]:
    """The method entry ``key`` of a saved model's config.json; a clear error if the directory lacks it."""
    config_file = Path(directory) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {directory}: not a saved model directory")
    entry = json.loads(config_file.read_text()).get(key)
    if entry is None:
        raise ValueError(f"{directory} holds no {key!r} model (no {key!r} entry in config.json)")
    return entry


def load_with_extra_params(
    directory: str | Path,
    transform: Callable[[PreTrainedModel], PreTrainedModel],
    is_extra: Callable[[str], bool],
    dtype: torch.dtype | None = None,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """from_pretrained (sharding, dtype, device_map), then ``transform`` (which adds the extra parameters),
    then copy the extra tensors from the checkpoint; a mismatch in their names is an error."""
    directory = Path(directory)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the extra tensors are "unexpected" for the dense class
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or "auto", **from_pretrained_kwargs)
    finally:
        logging.set_verbosity(verbosity)
    model = transform(model)
    saved = read_tensors(directory, is_extra)
    params = dict(model.named_parameters())
    expected = {k for k in params if is_extra(k)}
    if set(saved) != expected:
        raise ValueError(f"extra tensors in {directory} do not match the model: {sorted(set(saved) ^ expected)[:4]}")
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v)
    return model.eval()
