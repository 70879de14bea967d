"""The one results writer: CSV tables with provenance columns, written atomically."""

from __future__ import annotations

import csv
import datetime as dt
import math
import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from dsmoe.packages import write_atomic

REPO = Path(__file__).resolve().parent.parent
PROVENANCE = ["model", "method", "tokens", "steps", "tau", "seed", "protocol", "hardware", "git_commit", "date"]


def results_root() -> Path:
    """Where tables, figures and benchmark CSVs go: the checkout's results/, or $DSMOE_RESULTS."""
    return Path(os.environ.get("DSMOE_RESULTS", REPO / "results"))


def hardware() -> str:
    """GPU names if CUDA is used, else the CPU model and the threads torch uses."""
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"{len(names)}x {names[0]}"
    return f"CPU {cpu_model()}, {torch.get_num_threads()} threads"


def cpu_model() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def training_hardware(num_nodes: int, devices: int, device: torch.device, strategy: str) -> str:
    """Where a run trained, e.g. "2 nodes x 8 NVIDIA H100 80GB HBM3, fsdp" (recorded by the run's rank 0; ``device``:
    its own)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu_model()}"
    nodes = f"{num_nodes} nodes x " if num_nodes > 1 else ""
    return f"{nodes}{devices} {name}, {strategy}"


def git_commit() -> str:
    """HEAD of the repository this package lives in, '+dirty' if tracked files other than the outputs in
    results/ changed; $DSMOE_GIT_COMMIT instead when set (a checkout copied without its .git, perhaps into another
    repository); 'unknown' outside git."""
    if os.environ.get("DSMOE_GIT_COMMIT"):
        return os.environ["DSMOE_GIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
            cwd=root,
            capture_output=True,
            text=True,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(**fields: Any) -> dict[str, Any]:
    """Provenance columns for one row: the given fields plus hardware, git commit and date."""
    unknown = set(fields) - set(PROVENANCE)
    if unknown:
        raise ValueError(f"unknown provenance fields {sorted(unknown)}; allowed: {PROVENANCE}")
    row = {k: fields.get(k, "") for k in PROVENANCE}
    row["hardware"] = fields.get("hardware") or hardware()
    row["git_commit"] = fields.get("git_commit") or git_commit()
    row["date"] = fields.get("date") or dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return row


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Write rows (with every column in ``columns``, extra keys refused) to path atomically."""
    path = Path(path)
    rows = list(rows)
    for row in rows:
        extra = set(row) - set(columns)
        if extra:
            raise ValueError(f"row has columns {sorted(extra)} not in the table's columns {list(columns)}")

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns))
            writer.writeheader()
            for row in rows:
                writer.writerow({c: _fmt(row.get(c, "")) for c in columns})

    write_atomic(path, write)
    return path


def _fmt(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return ""  # undefined (e.g. the sd of one seed): a blank cell, read back as NaN by pandas
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
