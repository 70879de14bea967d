"""Host memory of a multi-process run: every process loads init_model/, and none may hold a private copy of the
weights before FSDP shards them (8 fp32 copies of a 7B model are ~216 GB of one node's RAM). init_model/ is saved in
the dtype training holds the weights in, and each method's load leaves its parameters as memory-mapped pages of
the saved file (shared by all processes through the page cache) instead of copying them."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from test_train import make_cfg
from tiny_models import tiny_model

from dsmoe.methods import get_method
from dsmoe.train import prepare_model

OPTIONS = {
    "dsmoe": {"num_experts": 8},
    "llama_moe": {"num_experts": 8, "top_k": 2},
    "sparsegpt": {"sparsity": 0.5},
    "llm_pruner_block": {"pruning_ratio": 0.5, "keep_first": 1, "keep_last": 1},
    "llm_pruner_channel": {"pruning_ratio": 0.3},
}

# Loads each directory twice (the first load imports and initialises everything) and prints the growth of the
# process's anonymous (private) memory during the second, with the parameters' bytes. MALLOC_MMAP_THRESHOLD_ fixes
# glibc's threshold so that freed tensors go back to the system instead of being kept for reuse.
CHILD = textwrap.dedent(
    """
    import json, sys
    from dsmoe.methods import get_method

    def private_bytes():
        line = next(l for l in open("/proc/self/status") if l.startswith("RssAnon:"))
        return int(line.split()[1]) * 1024

    out = {}
    for name, directory in json.loads(sys.argv[1]).items():
        load = get_method(name).load
        load(directory)  # warm-up
        before = private_bytes()
        model = load(directory)
        grown = private_bytes() - before
        out[name] = [grown, sum(p.numel() * p.element_size() for p in model.parameters())]
        del model
    print(json.dumps(out))
    """
)


# a Llama of 25 MB of fp32 weights: large enough for allocator noise to be small against it
SHAPE = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8}


def _dense():
    return tiny_model("llama", **SHAPE, num_key_value_heads=4, vocab_size=4096)


def test_every_method_loads_its_weights_memory_mapped_not_copied(tmp_path):
    torch.manual_seed(0)
    calib = [torch.randint(0, 4096, (2, 32)) for _ in range(2)]
    dirs = {}
    for name, options in OPTIONS.items():
        method = get_method(name)
        model = method.apply(_dense(), options, calib)
        dirs[name] = str(method.save(model, tmp_path / name))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(dirs)], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    grown = json.loads(run.stdout.strip().splitlines()[-1])
    # SparseGPT keeps a bool mask per decoder weight (1 byte per 4-byte weight, ~17% of these weights)
    allowed = {name: 0.25 if name == "sparsegpt" else 0.05 for name in OPTIONS}
    private = {name: round(grown / weights, 3) for name, (grown, weights) in grown.items()}
    assert set(private) == set(OPTIONS)
    assert {n: f for n, f in private.items() if f >= allowed[n]} == {}, f"private fraction of the weights: {private}"


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-mixed", "F32"), ("32-true", "F32"), ("bf16-true", "BF16")])
def test_init_model_is_saved_in_the_dtype_training_holds_weights_in(tmp_path, assets, precision, dtype):
    source = tmp_path / "bf16_model"
    dense = tiny_model("llama", vocab_size=256).to(torch.bfloat16)
    dense.save_pretrained(source)
    for f in (assets / "model").glob("*token*"):
        (source / f.name).write_bytes(f.read_bytes())
    cfg = make_cfg(assets, tmp_path / "runs", model=str(source), **{"trainer.precision": precision})
    prepare_model(cfg, tmp_path / "init_model")
    with safe_open(str(tmp_path / "init_model" / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        weight = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert dtypes == {dtype}
    assert torch.equal(weight.to(torch.bfloat16), dense.model.layers[0].mlp.down_proj.weight)  # the cast is exact
