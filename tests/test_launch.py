"""The driver's side of a training run (dsmoe.launch): the launcher prefix, exit statuses, signals passed on to
every process of the run, and what would hang refused before anything starts."""

import os
from types import SimpleNamespace

import pytest


def test_launcher_prefix_exit_status_and_preemption(monkeypatch, tmp_path):
    import subprocess
    import sys

    import dsmoe.launch as launch

    seen, codes = [], iter([0, 143, 1, 1, 1])
    (tmp_path / "launch.yaml").write_text(f"out_dir: {tmp_path}\nrun_name: run\n")
    marker = tmp_path / "run" / "preempted"

    class FakePopen:
        pid = -12345

        def __init__(self, command, process_group, stdin, preexec_fn, pass_fds):
            assert process_group == 0 and stdin == subprocess.DEVNULL  # a group of its own, no terminal input
            seen.append(command)

        def wait(self):
            code = next(codes)
            if writes_marker:  # dsmoe.train's rank 0 after saving on SIGTERM
                marker.parent.mkdir(exist_ok=True)
                marker.write_text("step 3\n")
            return code

    writes_marker = False
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.setattr(launch, "stop_process_group", lambda group, signum: seen.append(("stop", group)))
    monkeypatch.setattr(launch, "slurm_kills_on_bad_exit", lambda: False)  # no scontrol through FakePopen
    monkeypatch.setenv("DSMOE_LAUNCHER", "srun --ntasks-per-node=8 --export='ALL,A=1 2'")
    launch.launch_training(tmp_path / "launch.yaml")
    assert seen[0] == ["srun", "--ntasks-per-node=8", "--export=ALL,A=1 2", sys.executable, "-m", "dsmoe.train"] + [
        "--config",
        str(tmp_path / "launch.yaml"),
    ]
    assert seen[1] == ("stop", -12345)  # whatever is left of the run's process group
    with pytest.raises(SystemExit) as stopped:
        launch.launch_training(tmp_path / "launch.yaml")
    assert stopped.value.code == 143
    with pytest.raises(launch.TrainingFailed, match="exit status 1"):
        launch.launch_training(tmp_path / "launch.yaml")
    writes_marker = True  # torchrun exits 1 when its ranks exit 143: the run's marker says it was preempted
    with pytest.raises(SystemExit) as stopped:
        launch.launch_training(tmp_path / "launch.yaml")
    assert stopped.value.code == 143
    writes_marker = False  # a marker from an earlier launch does not make a failure a preemption
    with pytest.raises(launch.TrainingFailed, match="exit status 1"):
        launch.launch_training(tmp_path / "launch.yaml")


def test_the_driver_keeps_ignored_signals_and_stops_after_a_late_sigterm(monkeypatch, tmp_path):
    """nohup's ignored hang-up stays ignored while a run trains; a SIGTERM passed on after the run's last step still
    stops the driver (143) instead of letting it go on to evaluate or train the next run."""
    import signal
    import subprocess

    import dsmoe.launch as launch

    (tmp_path / "launch.yaml").write_text(f"out_dir: {tmp_path}\nrun_name: run\n")
    monkeypatch.setenv("DSMOE_LAUNCHER", "true")
    monkeypatch.setattr(launch, "stop_process_group", lambda group, signum: None)
    seen = []

    class FakePopen:
        pid = -1

        def __init__(self, command, **kwargs):
            pass

        def send_signal(self, signum):
            seen.append(signum)

        def wait(self):
            seen.append(signal.getsignal(signal.SIGHUP))
            if term:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives after the run's last step: it exits 0
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        term = False
        launch.launch_training(tmp_path / "launch.yaml")
        assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        term = True
        with pytest.raises(SystemExit) as stopped:
            launch.launch_training(tmp_path / "launch.yaml")
        assert stopped.value.code == 143 and seen[-1] == signal.SIGTERM
    finally:
        signal.signal(signal.SIGHUP, previous)


RUN_WITH_A_STRAY = """
import os, signal, subprocess, sys, time
stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # a rank left behind
ttou_ignored = signal.getsignal(signal.SIGTTOU) == signal.SIG_IGN
stdin_closed = os.path.realpath("/proc/self/fd/0") == "/dev/null"
open(os.environ["PIDS"] + ".tty", "w").write(f"{ttou_ignored} {stdin_closed}")
open(os.environ["PIDS"], "w").write(f"{os.getpid()} {stray.pid}")
if os.environ["HOW"] == "fail":
    sys.exit(1)
time.sleep(300)  # until a signal: SIGTERM's default action, as before Lightning's handler is installed
"""


@pytest.mark.parametrize(
    "how, signum, code",
    [("fail", None, None), ("term", "SIGTERM", 143), ("hup", "SIGHUP", 143), ("int", "SIGINT", 130)],
)
def test_no_process_of_a_run_outlives_it(monkeypatch, tmp_path, how, signum, code):
    """A run's processes die with it: a rank its rank 0 left behind (rank 0 failed, or was killed by a SIGTERM that
    came before it could pass one on) is stopped by the driver. A SIGTERM passed on (or a hang-up) counts as a
    preemption (143), whatever the run's exit status; Ctrl-C stops everything (130)."""
    import signal
    import sys
    import threading
    import time

    import dsmoe.launch as launch

    (tmp_path / "launch.yaml").write_text(f"out_dir: {tmp_path}\nrun_name: run\n")
    (tmp_path / "run.py").write_text(RUN_WITH_A_STRAY)
    pids = tmp_path / "pids"
    monkeypatch.setenv("DSMOE_LAUNCHER", f"{sys.executable} {tmp_path / 'run.py'}")
    monkeypatch.setenv("PIDS", str(pids))
    monkeypatch.setenv("HOW", how)

    def signal_the_driver() -> None:  # as SLURM or the terminal would, once the run has started
        while not pids.exists() or len(pids.read_text().split()) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), getattr(signal, signum))

    if signum:
        threading.Thread(target=signal_the_driver, daemon=True).start()
    expected = pytest.raises(SystemExit) if signum else pytest.raises(launch.TrainingFailed, match="status 1")
    # the signal must reach the driver where the tests themselves run under nohup (hang-up ignored) or in the
    # background of a shell (Ctrl-C ignored): an ignored signal stays ignored, as tested above
    hup = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with expected as stopped:
            launch.launch_training(tmp_path / "launch.yaml")
    finally:
        signal.signal(signal.SIGHUP, hup)
        signal.signal(signal.SIGINT, sigint)
    if code:
        assert stopped.value.code == code
    # in the terminal's background: writing must not stop it, and it reads nothing from the terminal
    assert (tmp_path / "pids.tty").read_text() == "True True"
    for pid in map(int, pids.read_text().split()):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)  # (not a child of this process: raises)
            except ChildProcessError:
                pass
            try:
                os.kill(pid, 0)
                if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                    break  # dead, not yet reaped by whoever adopted it
            except (ProcessLookupError, FileNotFoundError):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"process {pid} of the run outlived it ({how})")


def test_a_driver_without_a_launcher_refuses_what_would_hang(tmp_path, monkeypatch):
    """Lightning starts one node's processes: a run on 2 nodes, or one inside a SLURM allocation of several tasks
    (Lightning then waits for srun tasks), would hang at 'MEMBER: 1/2'. The driver stops first, saying what to do."""
    import subprocess

    import dsmoe.launch as launch

    monkeypatch.delenv("DSMOE_LAUNCHER", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.setattr(subprocess, "Popen", lambda command, **kwargs: pytest.fail("nothing may start"))
    config = tmp_path / "launch.yaml"
    config.write_text(f"out_dir: {tmp_path}\nrun_name: run\ntrainer:\n  num_nodes: 2\n")
    with pytest.raises(
        launch.TrainingFailed, match=r"num_nodes=2 nodes.*-m torch.distributed.run --nnodes=2 .*launch.yaml"
    ):
        launch.launch_training(config)
    config.write_text(f"out_dir: {tmp_path}\nrun_name: run\ntrainer:\n  num_nodes: 1\n")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_NAME", "table1.sbatch")
    with pytest.raises(launch.TrainingFailed, match=r"runs where this SLURM job step has \(SLURM_NTASKS\) 8 proc"):
        launch.launch_training(config)
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning then starts the processes itself: allowed
    started = []
    monkeypatch.setattr(
        subprocess,
        "Popen",
        lambda command, **kwargs: started.append(command) or SimpleNamespace(wait=lambda: 0, pid=-1),
    )
    monkeypatch.setattr(launch, "stop_process_group", lambda group, signum: None)
    launch.launch_training(config)
    assert len(started) == 1


@pytest.mark.parametrize(
    "command, warned",
    [
        ("srun --ntasks-per-node=8", True),
        ("/usr/bin/srun --ntasks-per-node=8 --kill-on-bad-exit=1", False),
        ("srun -K --ntasks-per-node=8", False),
        ("srun --kill-on-bad-exit=0", True),
        ("torchrun --no-python --nproc-per-node=8", False),
    ],
)
def test_srun_without_kill_on_bad_exit_is_warned_about(command, warned, tmp_path, monkeypatch, capsys):
    """A failing rank would leave the others srun started waiting for the process-group timeout."""
    import shlex

    import dsmoe.launch as launch

    monkeypatch.delenv("SLURM_KILL_BAD_EXIT", raising=False)
    bin_dir = tmp_path / "bin"  # a cluster's scontrol, answering as its slurm.conf says
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "KillOnBadExit           = $KILL"\necho "KillWait = 30 sec"\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KILL", "0")
    launch.warn_srun_without_kill_on_bad_exit(shlex.split(command))
    assert ("without --kill-on-bad-exit=1" in capsys.readouterr().err) == warned
    monkeypatch.setenv("KILL", "1")  # slurm.conf's default for srun, where the flag is not given
    launch.warn_srun_without_kill_on_bad_exit(shlex.split(command))
    assert ("without --kill-on-bad-exit=1" in capsys.readouterr().err) == (command == "srun --kill-on-bad-exit=0")
    monkeypatch.setenv("SLURM_KILL_BAD_EXIT", "1")  # srun's own default, set for the job
    launch.warn_srun_without_kill_on_bad_exit(shlex.split(command))
    assert capsys.readouterr().err == ""


RUN_UNTIL_TERM = """
import os, signal, sys, time
from pathlib import Path
out = Path(os.environ["OUT"])

def save_and_stop(*args):
    out.with_suffix(".saving").write_text("")
    time.sleep(1.5)  # writing its checkpoint
    out.with_suffix(".term").write_text("term")
    sys.exit(143)

signal.signal(signal.SIGTERM, save_and_stop)
out.write_text(str(os.getpid()))
time.sleep(60)
"""


def test_a_run_gets_sigterm_when_its_driver_is_killed_and_holds_the_run_lock_while_it_saves(tmp_path):
    """kill -9 of the driver: its run saves and stops (SIGTERM) instead of training on as an orphan, and no second
    driver takes the run directory while it is still saving."""
    import fcntl
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    (tmp_path / "launch.yaml").write_text(f"out_dir: {tmp_path}\nrun_name: run\n")
    (tmp_path / "run.py").write_text(RUN_UNTIL_TERM)
    out = tmp_path / "run.pid"
    env = {**os.environ, "DSMOE_LAUNCHER": f"{sys.executable} {tmp_path / 'run.py'}", "OUT": str(out)}
    code = (
        "from pathlib import Path; from dsmoe.launch import launch_training, run_lock\n"
        f"with run_lock(Path('{run}')): launch_training(Path('{tmp_path}/launch.yaml'))"
    )
    driver = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 10
    while not out.with_suffix(".saving").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not out.with_suffix(".saving").exists():
        os.kill(int(out.read_text()), signal.SIGKILL)
        raise AssertionError("the run outlived its killed driver without a SIGTERM")
    with open(run / ".driver.lock") as lock:
        with pytest.raises(BlockingIOError):  # the saving run holds it
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        deadline = time.monotonic() + 10
        while not out.with_suffix(".term").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the run has stopped


def test_a_run_whose_driver_died_before_it_started_does_not_start():
    """Between fork and exec the run's first process has the driver's SIGTERM handler: a parent found dead there ends
    it (status 143), not a SIGTERM the copied handler would swallow."""
    import signal
    import subprocess
    import sys

    from dsmoe.launch import linux_prctl, term_when_parent_dies

    prctl = linux_prctl()
    previous = signal.signal(signal.SIGTERM, lambda *args: None)  # as launch_training installs its own
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(30)"],
            preexec_fn=lambda: term_when_parent_dies(-1, prctl),  # -1: never the parent: it has died
        )
        assert child.wait(timeout=20) == 143
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_second_driver_of_a_run_waits_for_the_first(tmp_path):
    import subprocess
    import sys
    import time

    from dsmoe.launch import run_lock

    code = f"from pathlib import Path; from dsmoe.launch import run_lock\nwith run_lock(Path('{tmp_path}/run')): print('in')"
    with run_lock(tmp_path / "run"):
        second = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        waiting = second.stderr.readline()
        assert (
            f"run is being trained by the driver with pid {os.getpid()} on " in waiting and "waiting for it" in waiting
        )
        time.sleep(0.5)
        assert second.poll() is None  # still waiting
    assert second.communicate(timeout=30)[0] == "in\n" and second.returncode == 0
