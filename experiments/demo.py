"""The README's first command: DSMoE on the embedded SmolLM2-135M, offline, on a laptop CPU.

    ./reproduce.sh demo            # or: python experiments/demo.py

1. dense perplexity of SmolLM2-135M on held-out text of the four embedded corpus domains;
2. conversion to DSMoE (n=8, τ=0.5): perplexity, mean active experts per layer, activated params;
3. a few minutes of continued pre-training (L_LM + L_sparse, eq. 19) through the suite's training entry
   point, then the same numbers again (TensorBoard logs under runs/demo/dsmoe/);
4. a greedy continuation of a prompt with the trained DSMoE model.
The random router init activates ~half the experts, so the converted model starts far worse than the
dense one; the paper trains 10B tokens, this demo a few ten thousand.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import dsmoe
from dsmoe.cli import run as run_cli
from dsmoe.evaluate import perplexity
from dsmoe.experiment import ensure_run, run_config, validation_windows
from dsmoe.models import load_model

PROMPT = "def fibonacci(n):\n    "


def report(title: str, model: torch.nn.Module, val: dict[str, torch.Tensor]) -> None:
    """PPL per source and overall (token-weighted); DSMoE activation accumulated over all sources."""
    print(f"\n== {title}")
    is_dsmoe = bool(dsmoe.dsmoe_layers(model))
    if is_dsmoe:
        dsmoe.reset_activation_stats(model)
    tokens, nll = 0, 0.0
    for name, windows in val.items():
        result = perplexity(model, list(windows), desc=name)
        tokens, nll = tokens + result.tokens, nll + result.nll_sum
        print(f"  PPL {name:9s} {result.ppl:10.2f}   ({result.tokens} tokens)")
    print(f"  PPL overall   {math.exp(nll / tokens):10.2f}")
    if is_dsmoe:
        stats = dsmoe.activation_stats(model)
        per_layer = " ".join(f"{a:.1f}" for a in stats.mean_active_per_layer)
        print(f"  mean active experts per layer (of {stats.num_experts}): {per_layer}")
        print(
            f"  mean active experts {stats.mean_active:.2f}; activated params {stats.activated_params / 1e6:.1f}M "
            f"of {stats.total_params / 1e6:.1f}M ({100 * stats.activated_fraction:.1f}%)"
        )


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    torch.manual_seed(0)
    start = time.time()
    cfg = run_config("demo", "dsmoe")  # experiments/configs/scales/demo.yaml: the same run table1 --scale demo uses
    dense, tokenizer = load_model(cfg.model)
    val = validation_windows("demo", tokenizer)
    print(f"SmolLM2-135M (embedded, dequantised Q4_1): {sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M params")
    report("dense model", dense, val)

    converted = dsmoe.convert(dense, dsmoe.DSMoEConfig(**cfg.method_options)).eval()
    report("converted to DSMoE (n=8, τ=0.5), before training", converted, val)

    print(f"\n== continued pre-training: {cfg.trainer.max_tokens:.0f} tokens, L = L_LM + L_sparse (eq. 19) ...")
    final = ensure_run("demo", "dsmoe")
    trained, _ = load_model(str(final))
    report("DSMoE after continued pre-training", trained, val)

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = trained.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    print(f"\n== generation with the trained DSMoE model\n{tokenizer.decode(out[0], skip_special_tokens=True)}")
    print(f"\nTensorBoard: tensorboard --logdir {final.parent / 'tensorboard'}")
    print(f"demo finished in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    run_cli(main)
