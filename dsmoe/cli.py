"""Command-line entry points report the user's mistakes in one line.

A bad config value, a missing file or a bad argument ends with ``error: <what and why>`` and exit status 2; a full
or read-only disk with ``error: <reason>: <file>`` and exit status 1; a full traceback only with ``--debug`` (or
DSMOE_DEBUG=1, which the training processes a driver starts inherit), and for anything else, which would be a bug.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import Any

import yaml
from omegaconf.errors import OmegaConfBaseException


def say(message: str) -> None:
    """Print to stderr, where the terminal may have gone (closed: a hang-up is handled as a SIGTERM), without
    failing: what follows a SIGTERM (the preempted marker, exit status 143) must still happen."""
    try:
        print(message, file=sys.stderr)
    except OSError:
        pass


class StepFailed(RuntimeError):
    """A step the command started (e.g. a training process) failed and has already reported why."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    OmegaConfBaseException,
    yaml.YAMLError,  # a config or scale file that is not YAML
)


# a full or read-only disk, or a folder this user may not write: one line naming the file, not a traceback
DISK_ERRORS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


def run(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """Call ``main(argv)`` (argv without ``--debug``), turning the user's mistakes into a one-line error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ["DSMOE_DEBUG"] = "1"
    debug = os.environ.get("DSMOE_DEBUG", "") not in ("", "0")
    try:
        return main(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:
        if debug or error.errno not in DISK_ERRORS:
            raise
        print(f"error: {error.strerror}: {error.filename or '(no file name given)'}", file=sys.stderr)
        raise SystemExit(1) from None
    except StepFailed as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
