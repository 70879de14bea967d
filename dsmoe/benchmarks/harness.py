"""Table 2 (paper §5.3.2) through lm-eval's own task definitions, on the hub data or the offline copies.

Each task is a small YAML that ``include:``s lm-eval's shipped config (prompt, metrics, filters,
generation settings stay lm-eval's) and overrides only the task name, the shot count of the paper
(zero-shot accuracy; 5-shot exact match for GSM8K, NaturalQs, TriviaQA, WebQs) and, offline, where
the data comes from:

    dataset_path: json, dataset_kwargs: {data_files: {test: <local .jsonl>}},
    training_split/validation_split: null, test_split: test, fewshot_split: test

The offline copies hold only the evaluation split, so few-shot examples are drawn from that same
file. The local file is registered as lm-eval's *test* split on purpose: lm-eval's sampler removes
the evaluated document from its own few-shot context only when ``fewshot_split == test_split``
(``ConfigurableTask.fewshot_context``). Online, lm-eval's defaults apply (training-split shots).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from dsmoe.benchmarks.data import UNAVAILABLE, UNAVAILABLE_REASONS, local_file, read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PaperTask:
    """One Table 2 column: the lm-eval task behind it, its shots, and the lm-eval result key reported."""

    name: str  # key of the results; lm-eval's task name except siqa (lm-eval: social_iqa)
    column: str  # Table 2 header
    config: str  # lm-eval task YAML, relative to lm_eval/tasks
    shots: int
    metric: str  # "<metric>,<filter>" as in lm-eval's results


# Table 2 order. HellaSwag and PIQA report acc_norm: the paper's LLaMA rows match lm-eval's acc_norm
# for these (e.g. LLaMA-7B HellaSwag 76.4, where lm-eval's plain acc is near 57).
PAPER_TASKS: tuple[PaperTask, ...] = (
    PaperTask("hellaswag", "Hellaswag", "hellaswag/hellaswag.yaml", 0, "acc_norm,none"),
    PaperTask("lambada_openai", "LAMBADA", "lambada/lambada_openai.yaml", 0, "acc,none"),
    PaperTask("piqa", "PIQA", "piqa/piqa.yaml", 0, "acc_norm,none"),
    PaperTask("siqa", "SIQA", "siqa/siqa.yaml", 0, "acc,none"),
    PaperTask("storycloze", "StoryCloze", "storycloze/storycloze_2016.yaml", 0, "acc,none"),
    PaperTask("winogrande", "Wino", "winogrande/default.yaml", 0, "acc,none"),
    PaperTask("gsm8k", "GSM8K", "gsm8k/gsm8k.yaml", 5, "exact_match,strict-match"),
    PaperTask("nq_open", "NaturalQs", "nq_open/nq_open.yaml", 5, "exact_match,remove_whitespace"),
    PaperTask("triviaqa", "TriviaQA", "triviaqa/default.yaml", 5, "exact_match,remove_whitespace"),
    PaperTask("webqs", "WebQs", "webqs/webqs.yaml", 5, "exact_match,none"),
)
_BY_NAME = {t.name: t for t in PAPER_TASKS}

# lm-eval 0.4.13 cannot render WebQs' few-shot answers: its target is the list of indices of all
# accepted answers, and ``build_qa_turn`` takes ``a[0]`` (an int) where it needs a string, so any
# num_fewshot > 0 fails ("Answer is not a string!"), online or offline. Index 0 makes the example
# show the first accepted answer in lm-eval's own choice order (sorted, prefixes removed).
FEWSHOT_FIXES = {"webqs": {"fewshot_config": {"doc_to_target": 0}}}


def select_tasks(names: Sequence[str] | None = None) -> list[PaperTask]:
    """The named paper tasks in Table 2 order (all ten when ``names`` is None)."""
    if names is None:
        return list(PAPER_TASKS)
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(_BY_NAME)}")
    return [t for t in PAPER_TASKS if t.name in names]


def lm_eval_task_name(task: PaperTask, offline: bool) -> str:
    """Distinct from the hub task names, so a run never silently picks lm-eval's own data loader."""
    return f"dsmoe_{'offline' if offline else 'hub'}_{task.name}"


def write_task_configs(directory: str | Path, tasks: Sequence[PaperTask], offline: bool) -> dict[str, str]:
    """Write one YAML per task into ``directory``; returns paper name → lm-eval task name."""
    import lm_eval.tasks

    shipped = Path(lm_eval.tasks.__file__).parent
    names = {}
    for task in tasks:
        if task.name in UNAVAILABLE_REASONS:
            raise ValueError(f"{task.name} is {UNAVAILABLE}: {UNAVAILABLE_REASONS[task.name]}")
        names[task.name] = lm_eval_task_name(task, offline)
        cfg = {"include": str(shipped / task.config), "task": names[task.name], "num_fewshot": task.shots}
        cfg.update(FEWSHOT_FIXES.get(task.name, {}))
        if offline:
            cfg.update(
                dataset_path="json",
                dataset_name=None,
                dataset_kwargs={"data_files": {"test": str(local_file(task.name))}},
                training_split=None,
                validation_split=None,
                test_split="test",
                fewshot_split="test",
            )
        (Path(directory) / f"{names[task.name]}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return names


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers an HTTP request within ``timeout`` seconds (checked once per process).

    The probe runs in a daemon thread: a hanging DNS lookup ignores socket timeouts.
    """
    from huggingface_hub import constants

    answered: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)  # the server answered
        except (OSError, ValueError):
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


def resolve_offline(offline: bool | None) -> bool:
    """None → offline if HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set or the hub does not answer."""
    if offline is not None:
        reason = "as requested"
    elif any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        offline, reason = True, "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
    else:
        offline = not hub_reachable()
        reason = "the hub is unreachable" if offline else "the hub is reachable"
    log.info("benchmarks: using %s (%s)", "the offline copies" if offline else "the hub datasets", reason)
    return offline


def _unavailable(task: PaperTask, limit: int | float | None) -> dict:
    return {"metric": task.metric, "value": None, "status": UNAVAILABLE, "n": 0, "shots": task.shots, "limit": limit}


def run_benchmarks(
    model,
    tokenizer,
    tasks: Sequence[str] | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    offline: bool | None = None,
    max_gen_toks: int | None = None,
    bootstrap_iters: int = 1000,
) -> dict[str, dict]:
    """Evaluate an in-memory causal LM (dense, DSMoE-converted, pruned, top-k) on the Table 2 tasks.

    Wraps ``model`` in lm-eval's ``HFLM`` and calls ``lm_eval.simple_evaluate``. Returns, per task
    in Table 2 order, ``{"metric", "value" (lm-eval's fraction in [0, 1]; None when unavailable),
    "stderr", "status" ("ok" | "unavailable offline"), "n" (items scored), "shots", "limit",
    "source" ("local" | "hub"), "metrics" (every number lm-eval reported)}``. ``limit`` is passed
    to lm-eval (first ``limit`` items, or a fraction when < 1) and echoed so the caller records it.
    ``max_gen_toks`` caps generation tasks (lm-eval's default is 256); ``bootstrap_iters`` only
    affects the stderr of non-mean metrics (LAMBADA perplexity).
    """
    selected = select_tasks(tasks)
    if limit is not None and not (isinstance(limit, (int, float)) and limit > 0):
        raise ValueError(f"limit must be a positive int (items) or a fraction in (0, 1), got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (sequences per forward), got {batch_size!r}")
    if max_gen_toks is not None and (not isinstance(max_gen_toks, int) or max_gen_toks < 1):
        raise ValueError(f"max_gen_toks must be a positive int or None, got {max_gen_toks!r}")
    runnable = [t for t in selected if t.name not in UNAVAILABLE_REASONS]
    for t in selected:
        if t.name in UNAVAILABLE_REASONS:
            log.info("benchmarks: %s is %s (%s)", t.name, UNAVAILABLE, UNAVAILABLE_REASONS[t.name])
    results = {t.name: _unavailable(t, limit) for t in selected if t.name in UNAVAILABLE_REASONS}
    if runnable:
        offline = resolve_offline(offline)
        results.update(_evaluate(model, tokenizer, runnable, limit, batch_size, offline, max_gen_toks, bootstrap_iters))
    return {t.name: results[t.name] for t in selected}


def _evaluate(model, tokenizer, tasks, limit, batch_size, offline, max_gen_toks, bootstrap_iters) -> dict[str, dict]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    try:
        # log-probabilities in fp32 whatever the model's dtype: lm-eval's default keeps a bf16 model's, and the
        # continuations' sums rounded to bf16 tie or flip the choices (HFLM sets eval mode)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype="float32")
        with tempfile.TemporaryDirectory(prefix="dsmoe_tasks_") as tmp:
            names = write_task_configs(tmp, tasks, offline)
            out = simple_evaluate(
                model=lm,
                tasks=list(names.values()),
                task_manager=TaskManager(include_path=tmp, include_defaults=False),
                limit=limit,
                gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
                bootstrap_iters=bootstrap_iters,
                log_samples=False,
            )
    finally:
        model.train(was_training)
    manifest = read_manifest() if offline else None
    results = {}
    for task in tasks:
        raw = out["results"][names[task.name]]
        metric, _, filt = task.metric.partition(",")
        stderr = raw.get(f"{metric}_stderr,{filt}")
        results[task.name] = {
            "metric": task.metric,
            "value": float(raw[task.metric]),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "status": "ok",
            "n": int(out["n-samples"][names[task.name]]["effective"]),
            "shots": task.shots,
            "limit": limit,
            "source": "local" if offline else "hub",
            "metrics": {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        }
        if manifest is not None:
            results[task.name]["data_sha256"] = manifest["tasks"][task.name]["sha256"]
    return results
