"""Every table and figure of a scale, one target after another: Tables 1-5 (Table 6 is Table 5's script at the
llama7b scale), Figs. 2 and 3.

    python experiments/all.py [--scale S] [--limit N] [--seeds N]      (./reproduce.sh all)

One process, so that a SIGTERM to it (a batch job's signal before its time limit) reaches the target running then,
which passes it on to its training run: the run saves a checkpoint and everything exits 143. Stops at the first
target that fails; run it again to go on (finished runs and cached evaluations are reused).
"""

import importlib
import sys
from pathlib import Path

from dsmoe.cli import run as run_cli
from dsmoe.targets import ALL, TARGET_SCRIPTS


def main(argv: list[str] | None = None) -> None:
    for target in ALL:
        print(f"[all] {target}: experiments/{TARGET_SCRIPTS[target]}", file=sys.stderr)
        importlib.import_module(Path(TARGET_SCRIPTS[target]).stem).main(argv)


if __name__ == "__main__":
    run_cli(main)
