"""Every table and figure of a scale, one target after another: Tables 1-5 (Table 6 is Table 5's script at the
llama7b scale), Figs. 2 and 3.

    python experiments/all.py [--scale S] [--limit N] [--seeds N]      (./reproduce.sh all)

Each target's script runs as a child of this process, which passes a SIGTERM or hang-up on to it (a batch job's
signal before its time limit reaches the target running then: its training run saves a checkpoint and everything
exits 143); Ctrl-C in the terminal reaches the target itself. Stops at the first target that fails, with its exit
status; run it again to go on (finished runs and cached evaluations are reused).
"""

import signal
import subprocess
import sys
from pathlib import Path

from dsmoe.cli import run as run_cli
from dsmoe.experiment import parse_scale
from dsmoe.targets import ALL, TARGET_SCRIPTS

HERE = Path(__file__).resolve().parent


def run_target(command: list[str]) -> int:
    """Run ``command`` and return its exit status (128 + N if signal N ended it). A SIGTERM or hang-up to this
    process is passed on to it as SIGTERM; Ctrl-C reaches it from the terminal (it is in this process's group), so
    this process only waits for it and then stops (130). Signals this process ignores (nohup) stay ignored."""
    child = subprocess.Popen(command)
    interrupted = []

    def forward(signum, frame) -> None:
        if signum == signal.SIGINT:
            interrupted.append(signum)  # not passed on: a second Ctrl-C would make srun abort at once
        else:
            child.send_signal(signal.SIGTERM)

    previous = {
        signum: signal.signal(signum, forward)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
        if signal.getsignal(signum) is not signal.SIG_IGN
    }
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    code = 128 - code if code < 0 else code
    return code or (130 if interrupted else 0)


def main(argv: list[str] | None = None) -> None:
    parse_scale(__doc__, argv)  # --help, and a bad --scale, --limit or --seeds named once, before any target runs
    for target in ALL:
        print(f"[all] {target}: experiments/{TARGET_SCRIPTS[target]}", file=sys.stderr, flush=True)
        code = run_target([sys.executable, str(HERE / TARGET_SCRIPTS[target]), *(argv or [])])
        if code:
            print(f"[all] stopped at {target} (exit status {code}); run it again to go on", file=sys.stderr)
            raise SystemExit(code)


if __name__ == "__main__":
    run_cli(main)
