"""Tables 5/6 (appendix B): DSMoE validation PPL at the checkpoints of its run, by tokens seen.

    python experiments/token_curve.py [--scale demo]   → results/<scale>/tables5_6_tokens.csv (+ .png)

Each checkpoint the training run saved (every trainer.checkpoint_every_n_steps) is exported to an HF
directory and evaluated like the final model.
"""

import re

from dsmoe.experiment import ensure_run, evaluate, parse_scale, results_dir, run_config, run_dir
from dsmoe.plots import token_curve
from dsmoe.results import PROVENANCE, write_csv
from dsmoe.train import export


def main(argv: list[str] | None = None) -> None:
    args = parse_scale(__doc__, argv)
    ensure_run(args.scale, "dsmoe")
    cfg = run_config(args.scale, "dsmoe")
    rd = run_dir(cfg)
    tokens_per_step = cfg.trainer.global_batch_size * cfg.data.seq_len
    ckpts = {}
    for path in (rd / "checkpoints").glob("*step=*.ckpt"):
        ckpts[int(re.search(r"step=(\d+)", path.name).group(1))] = path
    rows = []
    for step in sorted(ckpts):
        out = rd / "exported" / f"step{step}"
        if not (out / "config.json").exists():
            export(ckpts[step], rd, out)
        r = evaluate(args.scale, "dsmoe", model_dir=out, tag=f"_step{step}")
        prov = {**r["provenance"], "tokens": step * tokens_per_step, "steps": step}
        rows.append(
            {
                "Tokens": step * tokens_per_step,
                "PPL": r["ppl"],
                "activated params %": 100 * r["activated_fraction"],
                **prov,
            }
        )
        print(f"step {step:6d}  tokens {step * tokens_per_step:.3g}  PPL {r['ppl']:.3f}")
    if not rows:
        raise SystemExit(f"no step checkpoints in {rd / 'checkpoints'}")
    columns = ["Tokens", "PPL", "activated params %", *PROVENANCE]
    print(f"wrote {write_csv(results_dir(args.scale) / 'tables5_6_tokens.csv', rows, columns)}")
    caption = f"DSMoE ({cfg.model}), PPL by continued pre-training tokens"
    print(
        f"wrote {token_curve([r['Tokens'] for r in rows], [r['PPL'] for r in rows], caption, results_dir(args.scale) / 'tables5_6_tokens.png')}"
    )


if __name__ == "__main__":
    main()
