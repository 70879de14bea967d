"""Entry points report the user's mistakes in one line (exit status 2), with the traceback only under --debug."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)


def test_bad_input_gives_one_error_line_and_status_2(tmp_path):
    proc = run("-m", "dsmoe.train", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: config file {tmp_path / 'missing.yaml'} does not exist"
    proc = run(str(ROOT / "experiments" / "table1.py"), "--limit", "-3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: --limit must be a positive number of benchmark items per task, got -3" in proc.stderr
    proc = run(str(ROOT / "experiments" / "table1.py"), "--scale", "huge")
    assert proc.returncode == 2 and "error: unknown scale 'huge'" in proc.stderr
    proc = run("-m", "dsmoe.train", "--config", str(tmp_path / "missing.yaml"), "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_a_bad_value_in_a_config_is_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("run_name: x\nout_dir: " + str(tmp_path) + "\noptim: {lr: -1.0e-3}\ntrainer: {max_steps: 2}\n")
    proc = run("-m", "dsmoe.train", "--config", str(config))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: optim.lr must be a positive number, got -0.001"
    assert not (tmp_path / "x").exists()


def test_ctrl_c_ends_with_one_line_and_status_130(monkeypatch):
    import pytest

    from dsmoe.cli import run as run_cli

    monkeypatch.setenv("DSMOE_DEBUG", "0")  # restored afterwards (--debug sets it)

    def interrupted(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        run_cli(interrupted, [])
    assert stopped.value.code == 130
    with pytest.raises(KeyboardInterrupt):  # --debug: the traceback
        run_cli(interrupted, ["--debug"])


def test_say_survives_a_closed_terminal(monkeypatch):
    """After a hang-up (handled as a SIGTERM) stderr may be a closed terminal: the message is lost, not the exit
    status 143 or the preempted marker that follow it."""
    from dsmoe.cli import say

    class ClosedTerminal:
        def write(self, text):
            raise OSError(5, "Input/output error")

        def flush(self):
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(sys, "stderr", ClosedTerminal())
    say("saved")


def test_a_full_or_read_only_disk_is_one_line_naming_the_file(capsys):
    import errno

    import pytest

    from dsmoe.cli import run as run_cli

    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/.step=6.ckpt.tmp")

    with pytest.raises(SystemExit) as stopped:
        run_cli(full, [])
    assert stopped.value.code == 1
    assert capsys.readouterr().err == "error: No space left on device: /runs/x/checkpoints/.step=6.ckpt.tmp\n"

    def broken(argv):
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError):  # anything else stays a traceback
        run_cli(broken, [])


def test_a_target_refuses_a_results_folder_it_cannot_create_before_training(tmp_path):
    import os

    (tmp_path / "afile").write_text("")
    env = {**os.environ, "DSMOE_RESULTS": str(tmp_path / "afile" / "results"), "DSMOE_RUNS": str(tmp_path / "runs")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "table1.py")], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: cannot create {tmp_path / 'afile' / 'results' / 'demo'}: Not a directory" in proc.stderr
