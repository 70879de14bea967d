"""HF-format save/load shared by every transformed model: dense weights through save_pretrained /
from_pretrained, extra tensors (routers, gates) read back from the same safetensors files.

A DSMoE, LLaMA-MoE or LLM-Pruner model is saved with HF remote code (see :mod:`dsmoe.hf_remote`): its
config.json names the method's model_type and an auto_map to the copied files, so plain transformers opens it
only with ``trust_remote_code=True``, as the method's model. The suite's loaders build the base architecture
from :func:`base_config`, which also reads directories saved before (base model_type plus the method entry).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel, logging

from dsmoe.hf_remote import REMOTE_DIR, REMOTE_FILES
from dsmoe.hf_remote.configuration_dsmoe import BASES, METHODS, class_name

WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin*")


def save_hf(
    model: PreTrainedModel, directory: str | Path, tokenizer: Any = None, remote_model_type: str | None = None
) -> Path:
    """save_pretrained the model (and tokenizer) into directory without leaving half-written files there.

    With ``remote_model_type`` (a method's model_type, see :data:`METHODS`) the directory becomes an HF
    remote-code model of that type (:func:`write_remote_code`). Everything is written to a temporary sibling
    directory first (one a killed save left is removed), then moved in file by file, config.json last (its presence
    marks a complete save); weight files of an earlier save that the new one does not overwrite (other shard counts)
    are removed. Other files in directory are left alone.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for left in directory.parent.glob(f".{directory.name}.saving.*"):  # a killed save's (a full copy of the weights)
        shutil.rmtree(left, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.saving."))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if remote_model_type is not None:
            write_remote_code(tmp, remote_model_type)
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


def write_remote_code(directory: Path, model_type: str) -> None:
    """Turn a saved base-architecture model into an HF remote-code one: copy the remote files in and set
    config.json's model_type, base_model_type, architectures and auto_map."""
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    base = config["base_model_type"] if config["model_type"] in METHODS else config["model_type"]
    config_name, model_name = (class_name(model_type, base, kind) for kind in ("Config", "ForCausalLM"))
    config.update(
        model_type=model_type,
        base_model_type=base,
        architectures=[model_name],
        auto_map={
            "AutoConfig": f"configuration_dsmoe.{config_name}",
            "AutoModelForCausalLM": f"modeling_dsmoe.{model_name}",
        },
    )
    for name in REMOTE_FILES:
        shutil.copyfile(REMOTE_DIR / name, directory / name)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(directory: str | Path) -> dict[str, Any]:
    """A model directory's config.json as a dict; an error naming the file when it is not valid JSON."""
    config_file = Path(directory) / "config.json"
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON ({error}): the model directory is damaged") from None


def damaged_weight_files(directory: str | Path) -> list[str]:
    """The safetensors files of a directory whose header cannot be read (truncated or not safetensors)."""
    from safetensors import safe_open

    bad = []
    for f in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own error type for a bad header
            bad.append(f"{f.name} ({str(error).splitlines()[0]})")
    return bad


def base_config(directory: str | Path) -> PreTrainedConfig:
    """The config of a saved model as its base architecture's (e.g. a LlamaConfig with the method entry), from
    an HF remote-code directory or from one saved before them; what the suite's loaders build models from."""
    config_file = Path(directory) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {directory}: not a saved model directory")
    config = read_config(directory)
    if config.get("model_type") not in METHODS:
        return AutoConfig.from_pretrained(directory)
    base = config.pop("base_model_type", None)
    if base not in BASES:
        raise ValueError(
            f"{config_file} has model_type {config['model_type']!r} and base_model_type {base!r}; "
            f"expected one of {sorted(BASES)}"
        )
    for key in ("auto_map", "architectures"):
        config.pop(key, None)
    config["model_type"] = base
    return BASES[base][1].from_dict(config)


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
        config = from_pretrained_kwargs.pop("config", None) or base_config(directory)
        model = AutoModelForCausalLM.from_pretrained(
            directory, config=config, dtype=dtype or "auto", **from_pretrained_kwargs
        )
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
