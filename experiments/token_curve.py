"""Tables 5/6 (appendix B): DSMoE validation PPL by continued pre-training tokens.

    python experiments/token_curve.py [--scale demo]   → results/<scale>/tables5_6_tokens.csv (+ .png)

The DSMoE run writes weights-only exports when it passes each of its ``trainer.export_tokens`` points (the paper's
token points at the llama1b / llama7b scales); each export, and the final model, is evaluated like the final model.
"""

import json

from dsmoe.cli import run as run_cli
from dsmoe.experiment import ensure_run, evaluate, parse_scale, results_dir, run_config, run_dir
from dsmoe.plots import token_curve
from dsmoe.results import PROVENANCE, write_csv


def main(argv: list[str] | None = None) -> None:
    args = parse_scale(__doc__, argv)
    final = ensure_run(args.scale, "dsmoe")
    cfg = run_config(args.scale, "dsmoe")
    rd = run_dir(cfg)
    points = []  # (tokens, steps, model directory, cache tag)
    for info_file in (rd / "exports").glob("tokens_*/export_info.json"):
        info = json.loads(info_file.read_text())
        if (info_file.parent / "config.json").exists():  # complete exports only
            points.append((info["tokens"], info["step"], info_file.parent, f"_step{info['step']}"))
    summary = json.loads((rd / "train_summary.json").read_text())
    points.append((summary["tokens"], summary["global_step"], final, ""))
    rows = []
    for tokens, step, model_dir, tag in sorted(points):
        r = evaluate(args.scale, "dsmoe", model_dir=model_dir if tag else None, tag=tag)
        prov = {**r["provenance"], "tokens": tokens, "steps": step}
        rows.append({"Tokens": tokens, "PPL": r["ppl"], "activated params %": 100 * r["activated_fraction"], **prov})
        print(f"step {step:6d}  tokens {tokens:.3g}  PPL {r['ppl']:.3f}")
    columns = ["Tokens", "PPL", "activated params %", *PROVENANCE]
    print(f"wrote {write_csv(results_dir(args.scale) / 'tables5_6_tokens.csv', rows, columns)}")
    caption = f"DSMoE ({cfg.model}), PPL by continued pre-training tokens"
    path = results_dir(args.scale) / "tables5_6_tokens.png"
    print(f"wrote {token_curve([r['Tokens'] for r in rows], [r['PPL'] for r in rows], caption, path)}")


if __name__ == "__main__":
    run_cli(main)
