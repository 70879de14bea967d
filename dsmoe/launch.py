"""The driver's side of a training run: start ``python -m dsmoe.train`` as its own process tree and wait for it.

An experiment script never joins a process group. Each training run is started here, by Lightning on this node or by
``$DSMOE_LAUNCHER`` (``srun``, ``torchrun --no-python ...``) on several, and signals reach all of its processes:
SIGTERM saves a checkpoint and stops (exit 143), Ctrl-C stops (exit 130), a failure raises :class:`TrainingFailed`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dsmoe.cli import StepFailed, say
from dsmoe.results import REPO as ROOT


def launcher() -> list[str]:
    """The command prefix that starts a training run's processes: ``$DSMOE_LAUNCHER`` split like a shell would
    (e.g. ``srun --ntasks-per-node=8`` or ``torchrun --no-python --nnodes=2 --nproc-per-node=8 ...``); none by
    default (Lightning starts the processes of one node)."""
    return shlex.split(os.environ.get("DSMOE_LAUNCHER", ""))


class TrainingFailed(StepFailed):
    pass


def check_launcher(cfg: DictConfig, config_file: Path) -> None:
    """Without ``$DSMOE_LAUNCHER`` Lightning starts the processes of this node only: a run on several nodes, or a
    driver inside a SLURM allocation of several tasks (Lightning would wait for srun tasks nobody starts), would
    hang. Both stop here, saying what to do. srun without --kill-on-bad-exit is warned about."""
    if launcher():
        warn_srun_without_kill_on_bad_exit(launcher())
        return
    nodes = int(OmegaConf.select(cfg, "trainer.num_nodes", default=1))
    if nodes > 1:
        raise TrainingFailed(
            f"{config_file} trains on trainer.num_nodes={nodes} nodes, and without DSMOE_LAUNCHER this driver starts "
            "processes on its own node only. Set DSMOE_LAUNCHER (e.g. "
            '"srun --ntasks-per-node=8 --kill-on-bad-exit=1" under SLURM), or '
            f"start the run on every node yourself: cd {shlex.quote(str(ROOT))} && PYTHONPATH={shlex.quote(str(ROOT))} "
            f"{shlex.quote(sys.executable)} -m torch.distributed.run --nnodes={nodes} --nproc-per-node=<GPUs per node> "
            f"--rdzv-backend=c10d --rdzv-endpoint=<first node>:29500 --rdzv-id=<a new id> --shutdown-timeout=600 "
            "-m dsmoe.train --config "
            f"{shlex.quote(str(config_file.resolve()))}; "
            "then run this target again (it finds the finished run)"
        )
    from dsmoe.train import launched_world_size

    launched = launched_world_size()  # as Lightning reads torchrun's and SLURM's variables
    if launched is not None and launched[0] > 1:
        raise TrainingFailed(
            f"this driver runs where {launched[1]} {launched[0]} processes, without DSMOE_LAUNCHER: Lightning in the "
            f'run would wait for {launched[0]} processes that nothing starts. Set DSMOE_LAUNCHER="srun '
            f'--ntasks-per-node=<GPUs per node> --cpus-per-task=$SLURM_CPUS_PER_TASK --kill-on-bad-exit=1" (README, '
            '"Several GPUs and nodes"), or allocate one task per node and let Lightning start the processes'
        )


def slurm_kills_on_bad_exit() -> bool:
    """Whether the cluster's slurm.conf makes srun kill a step's other tasks when one fails (KillOnBadExit=1)."""
    try:
        shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):  # no scontrol here, or it does not answer
        return False
    return re.search(r"^KillOnBadExit\s*=\s*1\s*$", shown, re.MULTILINE) is not None


def warn_srun_without_kill_on_bad_exit(command: list[str]) -> None:
    """A failing rank (e.g. a hub read error in its data loader) leaves the other ranks srun started waiting in their
    next collective until the process-group timeout (30 min under NCCL), holding their GPUs, unless srun kills the
    job's other tasks when one fails (--kill-on-bad-exit / -K, SLURM_KILL_BAD_EXIT=1, or slurm.conf's
    KillOnBadExit=1 where the flag is not given)."""
    if not command or Path(command[0]).name != "srun" or os.environ.get("SLURM_KILL_BAD_EXIT") == "1":
        return
    flags = [a for a in command[1:] if a.startswith(("--kill-on-bad-exit", "-K"))]
    if (not flags and not slurm_kills_on_bad_exit()) or any(a.endswith(("=0", "-K0")) for a in flags):
        print(
            "[experiment] warning: DSMOE_LAUNCHER runs srun without --kill-on-bad-exit=1: if one rank fails, the "
            "others wait until the process-group timeout (30 min under NCCL), holding their GPUs",
            file=sys.stderr,
        )


def launch_training(config_file: Path) -> None:
    """Run ``python -m dsmoe.train --config config_file`` as its own process tree and wait for it. A SIGTERM to the
    driver is passed on to the run's first process (Lightning's rank 0, or the launcher), which passes it to the
    others: the driver exits 143 once the run has stopped (with a checkpoint, where training had begun); so does a
    hang-up (the terminal closed). Ctrl-C stops the run (exit 130). However the run ends, none of its processes
    outlives it: a rank whose rank 0 died before it could pass a signal on would otherwise wait for it, holding its
    GPU, until the process group's timeout."""
    from dsmoe.train import PREEMPTED, PREEMPTED_MARKER

    command = [*launcher(), sys.executable, "-m", "dsmoe.train", "--config", str(config_file)]
    saved = OmegaConf.load(config_file)
    check_launcher(saved, config_file)
    print(f"[experiment] {shlex.join(command)}", file=sys.stderr)
    marker = Path(saved.out_dir) / saved.run_name / PREEMPTED_MARKER
    marker.unlink(missing_ok=True)
    proc: subprocess.Popen | None = None
    received: list[int] = []

    def on_term(signum, frame) -> None:  # SIGTERM; a hang-up (terminal closed) is handled as one
        received.append(signal.SIGTERM)
        if proc is not None:
            proc.send_signal(signal.SIGTERM)  # not to the DataLoader workers, which would die of it

    def on_interrupt(signum, frame) -> None:  # the terminal's Ctrl-C no longer reaches the run's group itself
        received.append(signum)
        if proc is not None:  # srun aborts on a second one within a second; from the third on: SIGKILL
            stop_process_group(proc.pid, signal.SIGINT if received.count(signal.SIGINT) <= 2 else signal.SIGKILL)

    handlers = {signal.SIGTERM: on_term, signal.SIGHUP: on_term, signal.SIGINT: on_interrupt}
    # a signal the driver was told to ignore (nohup, a background job's SIGINT) stays ignored
    previous = {
        signum: signal.signal(signum, handler)
        for signum, handler in handlers.items()
        if signal.getsignal(signum) is not signal.SIG_IGN
    }
    # the run is in a background group of the terminal: with `stty tostop` its output would stop it (SIGTTOU);
    # the ignored signal is inherited by all of its processes
    previous[signal.SIGTTOU] = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        # its own group: all of the run's processes, found again; no terminal input (in the terminal's background,
        # a read would stop it: srun forwards stdin to its tasks)
        # the run holds the innermost run lock too: a killed driver's run keeps it until it has saved and stopped
        parent, prctl = os.getpid(), linux_prctl()
        proc = subprocess.Popen(
            command,
            process_group=0,
            stdin=subprocess.DEVNULL,
            preexec_fn=lambda: term_when_parent_dies(parent, prctl),
            pass_fds=tuple(HELD_LOCKS[-1:]),
        )
        signal.signal(signal.SIGTTOU, previous.pop(signal.SIGTTOU))
        if received:  # a signal came before the run had started (the run's first process is all there is yet)
            proc.send_signal(signal.SIGTERM if received[-1] == signal.SIGTERM else signal.SIGINT)
        code = proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if proc is not None:
            stop_process_group(proc.pid, signal.SIGKILL)  # what is left of the run
    if signal.SIGINT in received:
        say("[experiment] interrupted; run the same command again to resume from the last checkpoint")
        raise SystemExit(130)
    # torchrun exits 1 when its ranks exit 143; a SIGTERM after the run's last step stops the driver too
    if code == PREEMPTED or signal.SIGTERM in received or (code and marker.exists()):
        say(
            "[experiment] training stopped by SIGTERM (its output above names the checkpoint it saved, if any); run "
            "the same command again to resume"
        )
        raise SystemExit(PREEMPTED)
    if code:
        raise TrainingFailed(
            f"training failed (exit status {code}; its output is above): {shlex.join(command)}. Fix the cause and run "
            "the target again: finished runs are skipped and this one resumes from its newest intact checkpoint, if any"
        )


def stop_process_group(group: int, signum: int) -> None:
    """Send ``signum`` to every process of a process group that is still alive."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:  # all gone
        pass


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def linux_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up in the driver (not between fork and exec, where the loader's lock may be held by
    another thread's copy); None where there is none (not Linux)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def term_when_parent_dies(parent: int, prctl: Callable[..., int] | None) -> None:
    """In the run's first process before it starts: a SIGTERM when the driver dies, even by SIGKILL (Linux), so
    that the run saves a checkpoint and stops instead of training on as an orphan beside the next driver's run."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the driver's handler, copied by fork, would swallow it until exec
    if prctl is None:  # the run outlives a killed driver
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the driver died before the request was made: the run does not start
        os._exit(143)


LOCK = ".driver.lock"
HELD_LOCKS: list[int] = []  # descriptors of the run locks this driver holds, innermost last


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.driver.lock`` while a driver trains the run there. A second driver of the same run (two targets
    started at once that share it) waits for the first, saying so, and then finds the run finished; two trainings of
    one directory would delete each other's checkpoints and prepared model. The run's first process holds the lock
    too (:func:`launch_training`), so a killed driver's run, saving on its SIGTERM, still holds it. On a filesystem
    without flock (some network filesystems) nothing is locked."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            say(f"[experiment] {run_dir} is being trained by {lock.read().strip() or 'another driver'}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # no flock here
            yield
            return
        lock.seek(0)
        lock.truncate()
        lock.write(f"the driver with pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        HELD_LOCKS.append(lock.fileno())
        try:
            yield
        finally:
            HELD_LOCKS.remove(lock.fileno())
            fcntl.flock(lock, fcntl.LOCK_UN)
