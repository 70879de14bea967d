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
import time

import torch

import dsmoe
from dsmoe.cli import run as run_cli
from dsmoe.experiment import ensure_run, evaluate_model, run_config, scale_config, validation_windows
from dsmoe.models import load_model

PROMPT = "def fibonacci(n):\n    "


def report(title: str, model: torch.nn.Module, val: dict[str, torch.Tensor], batch_size: int) -> None:
    """PPL per source and overall (token-weighted); for DSMoE, its measured activation (dsmoe.experiment's
    evaluation, the one Table 1 uses)."""
    print(f"\n== {title}")
    result = evaluate_model(model, val, batch_size)
    for name, ppl in result["ppl_per_source"].items():
        print(f"  PPL {name:9s} {ppl:10.2f}   ({result['tokens_per_source'][name]} tokens)")
    print(f"  PPL overall   {result['ppl']:10.2f}")
    if "mean_active" in result:
        per_layer = " ".join(f"{a:.1f}" for a in result["mean_active_per_layer"])
        print(f"  mean active experts per layer: {per_layer}   ({result['configuration']})")
        print(
            f"  mean active experts {result['mean_active']:.2f}; activated params "
            f"{result['activated_params'] / 1e6:.1f}M of {result['params'] / 1e6:.1f}M "
            f"({100 * result['activated_params'] / result['params']:.1f}%)"
        )


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    torch.manual_seed(0)
    start = time.time()
    cfg = run_config("demo", "dsmoe")  # experiments/configs/scales/demo.yaml: the same run table1 --scale demo uses
    dense, tokenizer = load_model(cfg.model)
    val = validation_windows("demo", tokenizer)
    batch_size = scale_config("demo").eval.batch_size
    print(f"SmolLM2-135M (embedded, dequantised Q4_1): {sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M params")
    report("dense model", dense, val, batch_size)

    converted = dsmoe.convert(dense, dsmoe.DSMoEConfig(**cfg.method_options)).eval()
    report("converted to DSMoE (n=8, τ=0.5), before training", converted, val, batch_size)

    print(f"\n== continued pre-training: {cfg.trainer.max_tokens:.0f} tokens, L = L_LM + L_sparse (eq. 19) ...")
    final = ensure_run("demo", "dsmoe")
    trained, _ = load_model(str(final))
    report("DSMoE after continued pre-training", trained, val, batch_size)

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = trained.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    print(f"\n== generation with the trained DSMoE model\n{tokenizer.decode(out[0], skip_special_tokens=True)}")
    print(f"\nTensorBoard: tensorboard --logdir {final.parent / 'tensorboard'}")
    print(f"demo finished in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    run_cli(main)
