"""Saved DSMoE / LLaMA-MoE / LLM-Pruner directories open in a process that never imports dsmoe, through HF remote
code (``trust_remote_code=True``), as the suite's loaders open them; without it transformers refuses."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import calib, tiny_model

import dsmoe
from dsmoe.baselines import llm_pruner as lp
from dsmoe.baselines.llama_moe import LLAMA_MOE, LlamaMoEConfig, convert_to_llama_moe, llama_moe_layers
from dsmoe.methods import get_method, method_of_saved
from dsmoe.models import load_model, load_tokenizer
from dsmoe.stats import count_params

WITHOUT_DSMOE = """
import sys

class NoDSMoE:  # the venv has dsmoe installed: make any import of it fail in this process
    def find_spec(self, name, path=None, target=None):
        if name == "dsmoe" or name.startswith("dsmoe."):
            raise ImportError(f"this process must not import {name}")
        return None

sys.meta_path.insert(0, NoDSMoE())
"""
NEVER_IMPORTED = (
    '\nassert not [m for m in sys.modules if m == "dsmoe" or m.startswith("dsmoe.")], "dsmoe was imported"\n'
)

OPEN_EACH = """
import json, torch
from transformers import AutoModelForCausalLM

cases, ids = json.load(open("cases.json")), torch.load("ids.pt")
out = {}
for name, directory in cases.items():
    try:
        AutoModelForCausalLM.from_pretrained(directory)
        refused = ""
    except ValueError as e:
        refused = str(e)
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    with torch.no_grad():
        logits = model(ids).logits
    ffn = type(model.model.layers[0].mlp)
    out[name] = {"logits": logits, "refused": refused, "training": model.training, "ffn": ffn.__name__,
                 "class": type(model).__name__}
torch.save(out, "opened.pt")
"""


def run_without_dsmoe(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "hf_modules"))
    code = WITHOUT_DSMOE + textwrap.dedent(script) + NEVER_IMPORTED
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def trained_like_routers(model: torch.nn.Module, std: float = 0.25, seed: int = 3) -> None:
    """Random routers (and noise weights) far from init, so that gates spread on both sides of τ / top-k varies."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.router." in name or ".mlp.noise." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def dsmoe_model(arch: str, tau: float, variant: str) -> torch.nn.Module:
    model = dsmoe.convert(tiny_model(arch), dsmoe.DSMoEConfig(num_experts=4, tau=tau, variant=variant))
    trained_like_routers(model)
    return model


def llama_moe_model(arch: str, **options) -> torch.nn.Module:
    model = convert_to_llama_moe(tiny_model(arch), LlamaMoEConfig(num_experts=4, top_k=2, **options))
    trained_like_routers(model)
    return model


def channel_pruned(arch: str) -> torch.nn.Module:
    model = tiny_model(arch)
    return lp.prune_to_target(model, 0.7 * count_params(model), "channel", calib())


BUILDERS = {  # τ as saved, each variant, each base architecture; both LLaMA-MoE gates; both LLM-Pruner modes
    "dsmoe_llama": lambda: dsmoe_model("llama", 0.5, "dsmoe"),
    "dsmoe_qwen2_no_ste": lambda: dsmoe_model("qwen2", 0.4, "no_ste"),
    "dsmoe_mistral_no_gate": lambda: dsmoe_model("mistral", 0.6, "no_gate"),
    "llama_moe_llama": lambda: llama_moe_model("llama"),
    "llama_moe_qwen2_mlp_gate": lambda: llama_moe_model(
        "qwen2", gate_network="mlp", noisy_gating=False, score_scale_factor=1.5
    ),
    "llm_pruner_channel_llama": lambda: channel_pruned("llama"),
    "llm_pruner_block_qwen2_tied": lambda: lp.prune_block(
        tiny_model("qwen2", tie_word_embeddings=True), [96, 64], [1, 2], calib()
    ),
}
REMOTE_FFN = {"dsmoe": "ThresholdGatedSwiGLU", "llama_moe": "TopKGatedSwiGLU", "llm_pruner": None}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, ids):
    """Every case saved by its method, the suite's logits, and what a process without dsmoe made of it."""
    root = tmp_path_factory.mktemp("remote")
    cases, suite = {}, {}
    for name, build in BUILDERS.items():
        model = build().eval()
        method = get_method(method_of_saved(model.config.to_dict()))
        method.save(model, root / name, None)
        loaded = method.load(root / name)
        with torch.no_grad():
            suite[name] = (loaded(ids).logits, model(ids).logits)
        cases[name] = str(root / name)
    (root / "cases.json").write_text(json.dumps(cases))
    torch.save(ids, root / "ids.pt")
    run_without_dsmoe(OPEN_EACH, root)
    return root, suite, torch.load(root / "opened.pt")


@pytest.mark.parametrize("name", list(BUILDERS))
def test_remote_code_gives_the_suites_model_and_plain_loading_refuses(saved, name):
    root, suite, opened = saved
    loaded, in_memory = suite[name]
    torch.testing.assert_close(loaded, in_memory, rtol=0, atol=0)  # the suite's own round trip
    remote = opened[name]
    assert "trust_remote_code=True" in remote["refused"]  # never silently a dense model
    assert remote["training"] is False
    config = json.loads((root / name / "config.json").read_text())
    assert config["model_type"].startswith("dsmoe") and config["auto_map"]["AutoModelForCausalLM"].startswith("model")
    family = next(k for k in REMOTE_FFN if name.startswith(k))
    if REMOTE_FFN[family]:
        assert remote["ffn"] == REMOTE_FFN[family]
    torch.testing.assert_close(remote["logits"], loaded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in BUILDERS if n.startswith("dsmoe")])
def test_dsmoe_cases_route_a_mix_of_experts(saved, ids, name):
    """The equality above means something only if τ and n/#active matter: tokens with different counts, some off."""
    root = saved[0]
    model = dsmoe.load(root / name)
    with torch.no_grad():
        model(ids)
    counts = torch.cat([layer.last_active.sum(1) for layer in dsmoe.dsmoe_layers(model)])
    assert len(counts.unique()) >= 3 and 0 < counts.float().mean() < 4
    assert dsmoe.dsmoe_config_of(model).tau == {"dsmoe_llama": 0.5, "dsmoe_qwen2_no_ste": 0.4}.get(name, 0.6)


def test_llama_moe_cases_route_more_than_k_experts_in_total(saved, ids):
    model = LLAMA_MOE.load(saved[0] / "llama_moe_llama")
    with torch.no_grad():
        model(ids)
    assert all(len(layer.last_indices.unique()) > layer.top_k for layer in llama_moe_layers(model))


def test_old_format_directories_still_load(tmp_path, ids):
    """Runs saved before the remote code (base model_type plus the method entry) load as they did."""
    for name in ("dsmoe_qwen2_no_ste", "llama_moe_llama", "llm_pruner_block_qwen2_tied"):
        model = BUILDERS[name]().eval()
        if name.startswith("llm_pruner"):  # save_llm_pruner's dense-shaped hidden size is a no-op in block mode
            assert model.config.llm_pruner["mode"] == "block"
        model.save_pretrained(tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert "auto_map" not in config and config["model_type"] in ("llama", "qwen2")
        method = method_of_saved(config)
        loaded = get_method(method).load(tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_method_of_saved_reads_both_formats(saved):
    root = saved[0]
    expected = {
        "dsmoe_llama": "dsmoe",
        "llama_moe_llama": "llama_moe",
        "llm_pruner_channel_llama": "llm_pruner_channel",
        "llm_pruner_block_qwen2_tied": "llm_pruner_block",
    }
    for name, method in expected.items():
        assert method_of_saved(json.loads((root / name / "config.json").read_text())) == method
    with pytest.raises(ValueError, match="model_type 'dsmoe' but no 'dsmoe' entry"):
        method_of_saved({"model_type": "dsmoe", "base_model_type": "llama"})


def test_unsupported_base_architecture_is_refused_before_writing(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2))
    model.config.dsmoe = dsmoe.DSMoEConfig().to_dict()  # as if converted: only the save is under test
    with pytest.raises(ValueError, match="'gpt2' base cannot be saved as HF remote code.*llama"):
        dsmoe.save(model, tmp_path / "m")
    assert not (tmp_path / "m" / "config.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_lm_eval_opens_a_saved_dsmoe_model_by_path(tmp_path):
    """lm-eval's HFLM by path with trust_remote_code, in a process without dsmoe = the suite's model in-process."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tokenizer = load_tokenizer()
    model = dsmoe.convert(tiny_model("llama", vocab_size=len(tokenizer)), dsmoe.DSMoEConfig(num_experts=4, tau=0.5))
    trained_like_routers(model)
    dsmoe.save(model.eval(), tmp_path / "m", tokenizer)
    requests = [
        ("The gate keeps an expert", " only when its score passes the threshold."),
        ("Sparse experts", " save compute at inference time."),
        ("A token with no active expert", " outputs zero."),
    ]
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    script = """
    import json
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained="m", trust_remote_code=True, device="cpu", batch_size=2)
    assert type(lm.model).__name__ == "DSMoELlamaForCausalLM", type(lm.model)
    requests = [Instance("loglikelihood", {}, tuple(r), i) for i, r in enumerate(json.load(open("requests.json")))]
    json.dump(lm.loglikelihood(requests, disable_tqdm=True), open("scores.json", "w"))
    """
    run_without_dsmoe(script, tmp_path)
    remote = json.loads((tmp_path / "scores.json").read_text())
    suite_model, suite_tokenizer = load_model(str(tmp_path / "m"))
    lm = HFLM(pretrained=suite_model, tokenizer=suite_tokenizer, batch_size=2)
    ours = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)], disable_tqdm=True)
    assert sum(dsmoe.activation_stats(suite_model).mean_active_per_layer) / 2 < 4  # routing was active
    for (logprob, greedy), (theirs, their_greedy) in zip(ours, remote, strict=True):
        assert logprob == pytest.approx(theirs, abs=1e-4) and greedy == their_greedy


def test_remote_code_refuses_transformers_4_naming_the_version(monkeypatch):
    """transformers 4 would read the config's RoPE settings (rope_parameters in 5) as absent: refused, not misread."""
    import importlib.util

    import transformers

    import dsmoe.hf_remote

    monkeypatch.setattr(transformers, "__version__", "4.46.3")
    path = Path(dsmoe.hf_remote.__file__).parent / "configuration_dsmoe.py"
    spec = importlib.util.spec_from_file_location("configuration_dsmoe_v4", path)
    with pytest.raises(ImportError, match=r"needs transformers >= 5 \(found 4.46.3\).*rope_parameters"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_remote_code_builds_the_saved_variant_and_tau():
    """Eval forwards agree across variants: what tells them apart in a reopened model is the layers' settings (a
    model fine-tuned after opening it with trust_remote_code trains as its variant)."""
    from dsmoe.hf_remote.modeling_dsmoe import to_dsmoe

    model = tiny_model("llama")
    to_dsmoe(model, {"num_experts": 4, "tau": 0.4, "variant": "no_gate"})
    ffns = [m for m in model.modules() if type(m).__name__ == "ThresholdGatedSwiGLU"]
    assert ffns and all(f.variant == "no_gate" and f.tau == 0.4 for f in ffns)
