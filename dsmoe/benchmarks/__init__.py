"""Downstream benchmarks of Table 2 (paper §5.3.2) via lm-eval's own task definitions, online or offline."""

from dsmoe.benchmarks.data import LOCAL_SOURCES, UNAVAILABLE, local_file, read_manifest, setup_benchmarks
from dsmoe.benchmarks.harness import PAPER_TASKS, PaperTask, resolve_offline, run_benchmarks, write_task_configs

__all__ = [
    "LOCAL_SOURCES",
    "PAPER_TASKS",
    "UNAVAILABLE",
    "PaperTask",
    "local_file",
    "read_manifest",
    "resolve_offline",
    "run_benchmarks",
    "setup_benchmarks",
    "write_task_configs",
]
