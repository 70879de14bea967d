"""Shared plumbing of the experiment scripts: scale configs, train-if-missing runs, cached evaluations.

A *scale* (experiments/configs/scales/<scale>.yaml) holds one base training config, one override block
per method and the evaluation sizes. ``ensure_run`` trains a method at a scale unless its final model
exists (an interrupted run resumes from its last checkpoint), so re-running a target skips finished
work; evaluations are cached as JSON next to the run.

An experiment script is a *driver*: it never joins a process group. Each training run is its own process tree
(:mod:`dsmoe.launch`), ``python -m dsmoe.train --config <run>/launch.yaml``, which Lightning expands to the ranks
of a node, or which ``$DSMOE_LAUNCHER`` (e.g. ``srun`` or ``torchrun --no-python ...``) starts on several nodes.
Once it has exited, the driver evaluates alone, on the GPUs when there are any (bf16, a model replica per GPU; in a
child process, so that the driver itself never holds GPU memory while later runs train), and writes the results.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from dsmoe.config_checks import is_plain_name
from dsmoe.evaluate import perplexity
from dsmoe.launch import TrainingFailed, launch_training, run_lock
from dsmoe.methods import method_of_model
from dsmoe.packages import read_json, write_json
from dsmoe.results import REPO, hardware, provenance, results_root
from dsmoe.stats import count_params

ROOT = REPO  # the checkout
SCALES_DIR = ROOT / "experiments" / "configs" / "scales"
SCALES = ("demo", "smollm2", "llama1b", "llama7b")


def scale_dirs() -> list[Path]:
    """Where scales are looked up, in order: $DSMOE_SCALES_DIR (your own, which override shipped ones of the same
    name), then the shipped experiments/configs/scales/."""
    own = os.environ.get("DSMOE_SCALES_DIR")
    if own and not Path(own).is_dir():
        raise ValueError(f"DSMOE_SCALES_DIR={own} is not a directory (it holds your <scale>.yaml files)")
    return ([Path(own)] if own else []) + [SCALES_DIR]


def known_scales() -> list[str]:
    return sorted({p.stem for folder in scale_dirs() for p in folder.glob("*.yaml")})


def checked_scale_name(scale: str) -> str:
    """``scale`` if it is a plain name (no path separator, no '..'): it names a file and the runs/results folders."""
    if not is_plain_name(scale):
        raise ValueError(
            f"scale {scale!r} is not a plain name (no path separators or '..'); choose one of {known_scales()}"
        )
    return scale


def results_dir(scale: str) -> Path:
    """results/<scale>/ ($DSMOE_RESULTS moves results/)."""
    return results_root() / checked_scale_name(scale)


def scale_config(scale: str) -> DictConfig:
    """The scale's YAML: {base: <train config>, methods: {run: overrides}, eval: {...}}.

    Scales live in experiments/configs/scales/ ($DSMOE_SCALES_DIR adds your own, looked in first)."""
    name = f"{checked_scale_name(scale)}.yaml"
    path = next((folder / name for folder in scale_dirs() if (folder / name).exists()), None)
    if path is None:
        folders = " and ".join(str(folder) for folder in scale_dirs())
        raise ValueError(f"unknown scale {scale!r}; choose one of {known_scales()} (YAML files in {folders})")
    return OmegaConf.create(checked_scale(str(path), path.stat().st_mtime_ns))  # a fresh copy per call


@functools.cache
def checked_scale(path: str, mtime_ns: int) -> dict[str, Any]:
    """A scale file checked against its schema once per version of the file (the drivers read it per evaluation)."""
    from dsmoe.scales import load_scale

    return load_scale(path).to_dict()


def runs_root(scale: str) -> Path:
    """runs/<scale>/ ($DSMOE_RUNS moves runs/)."""
    return Path(os.environ.get("DSMOE_RUNS", ROOT / "runs")) / checked_scale_name(scale)


def run_name(run: str, seed: int = 0) -> str:
    """The directory of a run's seed-th repetition (the first keeps the run's name)."""
    return run if seed == 0 else f"{run}_seed{seed}"


def run_config(scale: str, run: str, seed: int = 0) -> DictConfig:
    """Train config of one run: structured defaults ← scale base ← the run's method block; its ``seed``-th
    repetition trains with trainer.seed + seed (router init, data order, calibration sample)."""
    from dsmoe.train import load_config

    sc = scale_config(scale)
    if run not in sc.methods:
        raise ValueError(f"scale {scale!r} has no run {run!r}; available: {sorted(sc.methods)}")
    cfg = OmegaConf.merge(load_config(None), sc.base, sc.methods[run])
    cfg.run_name, cfg.out_dir = run_name(run, seed), str(runs_root(scale))
    cfg.trainer.seed += seed
    return cfg


def defined_runs(scale: str, runs: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """The (run, label) pairs of ``runs`` that the scale defines ("dense" always); the others are named on stderr,
    as their rows are left out of the table."""
    methods = scale_config(scale).methods
    missing = [run for run, _ in runs if run != "dense" and run not in methods]
    if missing:
        print(f"[experiment] scale {scale!r} defines no run {missing}: left out of this table", file=sys.stderr)
    return [(run, label) for run, label in runs if run not in missing]


def evaluate_dsmoe_first(scale: str, seeds: int) -> None:
    """Train and evaluate DSMoE's runs, seed by seed, before anything else (Tables 1 and 2): the baselines match the
    activated fraction each seed learned, and the runs then go in the order ``--plan`` prints."""
    for seed in range(seeds):
        evaluate(scale, "dsmoe", seed=seed)


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.out_dir) / cfg.run_name


def is_finished(cfg: DictConfig) -> bool:
    return (run_dir(cfg) / "train_summary.json").exists() and (run_dir(cfg) / "final" / "config.json").exists()


def ensure_run(scale: str, run: str, seed: int = 0) -> Path:
    """The run's final model directory, training it first (in its own processes) unless a finished run exists; a
    run directory trained with other settings is refused (:func:`dsmoe.train.check_same_run`). A driver that finds
    another one training the run waits for it (:func:`dsmoe.launch.run_lock`)."""
    from dsmoe.train import check_same_run, holds_work, saved_config

    cfg = run_config(scale, run, seed)
    cfg.data.sources = pinned_sources(scale, cfg.data.sources)
    matched = cfg.method_options.get("match_activated") == "dsmoe"
    if matched:
        cfg.match_activated_from = "dsmoe"
    final = run_dir(cfg) / "final"

    def finished() -> bool:
        check_same_run(run_dir(cfg), cfg)
        done = is_finished(cfg)
        if done:
            print(f"[experiment] {scale}/{cfg.run_name}: finished run found, skipping training")
        return done

    if finished():  # without the lock: a runs folder that is only read
        return final
    with run_lock(run_dir(cfg)):
        if finished():  # trained meanwhile, by the driver this one waited for
            return final
        if matched:  # baselines match the activated params DSMoE learned (paper §5.2), seed by seed
            if holds_work(run_dir(cfg)):  # an interrupted run resumes with the fraction it was prepared for
                fraction = saved_config(run_dir(cfg)).method_options.match_activated
            else:
                fraction = evaluate(scale, "dsmoe", seed=seed)["activated_fraction"]
            cfg.method_options.match_activated = fraction
        cfg.resume = "last"
        config_file = run_dir(cfg) / "launch.yaml"
        config_file.write_text(OmegaConf.to_yaml(cfg))
        launch_training(config_file)
    if not is_finished(cfg):
        raise TrainingFailed(f"the training process exited without writing {final} and train_summary.json")
    return final


SETTINGS_KEY = "evaluated_with"


def cached(path: Path, compute, settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON result at path if it was computed with these ``settings`` (the model's files, the held-out data,
    the evaluation settings), else ``compute()``'s, written atomically with the settings under "evaluated_with".

    A result computed with other settings (e.g. the scale's ``eval.val_windows`` changed, or the run was trained
    again) is computed again rather than reused; the returned dict never holds the settings key."""
    stored = stored_result(path, settings)
    if stored is not None:
        return stored
    value = compute()
    store_result(path, value, settings)
    return value


def stored_result(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON result at path if it was computed with these settings (see :func:`cached`), else None."""
    settings = json.loads(json.dumps(settings))  # the form it takes in the file (tuples as lists)
    if not path.exists():
        return None
    try:
        stored = read_json(path)
    except ValueError as error:  # a cache: computed again
        print(f"[experiment] {error}: computing it again", file=sys.stderr)
        return None
    before = stored.pop(SETTINGS_KEY, None) if isinstance(stored, dict) else "not a mapping"
    if not stored or not isinstance(before, (dict, type(None))):  # not a result, or its settings are not one
        print(f"[experiment] {path} holds no result: computing it again", file=sys.stderr)
        return None
    if before == settings:
        return stored
    changed = sorted(settings) if before is None else sorted(k for k in settings if before.get(k) != settings[k])
    print(f"[experiment] {path} was computed with other {', '.join(changed)}: computing it again", file=sys.stderr)
    return None


def store_result(path: Path, value: dict[str, Any], settings: dict[str, Any]) -> None:
    write_json(path, {**value, SETTINGS_KEY: json.loads(json.dumps(settings))})


def model_fingerprint(source: str) -> str | list:
    """What identifies a model's weights for the cache: a hub name or alias as given; a directory by its files'
    names, sizes and modification times (a run trained again writes new files)."""
    folder = Path(source)
    if not folder.is_dir():
        return source
    files = sorted(f for f in folder.iterdir() if f.is_file())
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def evaluation_settings(scale: str, source: str) -> dict[str, Any]:
    """The settings a scale's validation PPL of the model at ``source`` depends on (the key of its cache)."""
    sc = scale_config(scale)
    return {
        "model": model_fingerprint(source),
        "data": pinned_data(scale),
        "protocol": eval_protocol(scale),
        "val_windows": sc.eval.get("val_windows"),
        "evaluated_on": evaluation_precision(),
        "batched": "longest first",  # documents of unequal length: the batching moves the last digits
        "activation_weights": "routed positions",  # each source's share of the mean activation (earlier: tokens)
    }


def evaluation_precision() -> str:
    """Where and in which dtype evaluation runs here, e.g. "cuda torch.bfloat16" (the numbers differ slightly)."""
    return f"{eval_devices()[0].type} {eval_dtype()}"


_WINDOWS: dict[tuple, dict[str, Any]] = {}


def pinned_sources(scale: str, sources: Any) -> list[Any]:
    """The scale's data sources with every hub dataset pinned to one commit, the same for all of the scale's runs
    and evaluations. The first use resolves the hub's current commit and records it in
    ``runs/<scale>/data_revisions.json``: runs of weeks would otherwise read a dataset updated in between (other
    held-out documents than training left out, a stream resumed at positions in other files). Sources with their
    own ``revision``, local and embedded ones are kept as given."""
    from dsmoe.data.sources import SourceConfig, hub_commit

    lock = runs_root(scale) / "data_revisions.json"
    pinned = read_json(lock) if lock.exists() else {}
    out = []
    for given in OmegaConf.to_container(sources) if isinstance(sources, ListConfig) else list(sources):
        source = SourceConfig.from_obj(given)
        if source.is_hub and source.revision is None:
            if source.name not in pinned:
                pinned[source.name] = hub_commit(source)
                write_json(lock, pinned)
            if pinned[source.name] is not None:
                given = {**({"preset": given} if isinstance(given, str) else given), "revision": pinned[source.name]}
        out.append(given)
    return out


def pinned_data(scale: str) -> dict[str, Any]:
    """The scale's data config, its hub sources pinned (:func:`pinned_sources`)."""
    data = OmegaConf.to_container(scale_config(scale).base.data)
    return {**data, "sources": pinned_sources(scale, data["sources"])}


def eval_protocol(scale: str) -> str:
    """How validation PPL is measured at a scale (``eval.protocol``, one of dsmoe.scales.PROTOCOLS, checked when the
    scale is loaded): "documents", the paper's (§5.1: each held-out document its own sequence of at most seq_len
    tokens), or "windows" (the held-out documents packed into seq_len+1 windows like training, the first
    ``eval.val_windows`` of them: fewer, fuller sequences for small runs)."""
    return scale_config(scale).eval.protocol


def validation_windows(scale: str, tokenizer) -> dict[str, Any]:
    """The scale's held-out sequences per source (the seeded random sample training holds out), under the scale's
    protocol (:func:`eval_protocol`): a [N, seq_len + 1] tensor of packed windows, or a list of document sequences.

    Read and tokenised once per process for the same data config and tokenizer: the τ sweeps evaluate one
    model up to 38 times."""
    sc = scale_config(scale)
    data_config = pinned_data(scale)
    protocol, n = eval_protocol(scale), sc.eval.get("val_windows")
    key = (json.dumps(data_config, sort_keys=True), protocol, n, tokenizer.name_or_path, len(tokenizer))
    if key not in _WINDOWS:
        from dsmoe.data import DataConfig, PretrainDataModule, document_eval_sequences

        data = PretrainDataModule(DataConfig.from_dict(data_config), tokenizer)
        data.prepare_data()
        data.setup("validate")
        if protocol == "documents":
            seq_len = data.config.seq_len
            held_out = [document_eval_sequences(tokenizer, docs, seq_len) for docs in data.val_documents]
        else:
            held_out = [w[:n] for w in data.val_windows]
        _WINDOWS[key] = dict(zip(data.val_source_names, held_out, strict=True))
    return _WINDOWS[key]


def eval_devices() -> list[torch.device]:
    """Where evaluation runs: every visible GPU (restrict them with CUDA_VISIBLE_DEVICES), else the CPU."""
    if torch.cuda.is_available():
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [torch.device("cpu")]


EVAL_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def eval_dtype() -> torch.dtype:
    """bf16 on a GPU, fp32 on the CPU; ``DSMOE_EVAL_DTYPE`` (bfloat16, float16, float32) chooses, e.g. float16 or
    float32 on GPUs without bf16 (V100, T4). Part of every cached evaluation's key ("evaluated_on")."""
    chosen = os.environ.get("DSMOE_EVAL_DTYPE", "")
    if chosen:
        if chosen not in EVAL_DTYPES:
            raise ValueError(f"DSMOE_EVAL_DTYPE={chosen!r} is not one of {', '.join(EVAL_DTYPES)}")
        return EVAL_DTYPES[chosen]
    return torch.bfloat16 if eval_devices()[0].type == "cuda" else torch.float32


def load_for_eval(source: str, device: torch.device | None = None) -> tuple[torch.nn.Module, Any]:
    """A model on ``device`` (default: the first evaluation device) in :func:`eval_dtype`."""
    from dsmoe.models import load_model

    device = device or eval_devices()[0]
    if device.type == "cuda":
        torch.cuda.set_device(device)  # what allocates on "cuda" without an index (lm-eval, say) lands here too
    model, tokenizer = load_model(source, dtype=eval_dtype())
    return model.to(device).eval(), tokenizer


T = TypeVar("T")


def on_the_gpus(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` for work that uses the GPUs: in a spawned child process when there are any, so that the driver
    never holds a CUDA context (about 0.5 GB per GPU that the training runs it starts next would lack, and which a
    GPU in exclusive-process mode would refuse them); in this process on the CPU (there too with
    ``DSMOE_EVAL_IN_CHILD=1``). ``fn`` and its arguments must pickle: a module-level function, plain values."""
    if not in_child_processes():
        return fn(*args)
    with child_processes(1) as pool:
        return pool.submit(fn, *args).result()  # a child's error is raised here, its traceback attached


def in_child_processes() -> bool:
    """Whether GPU work runs in child processes: where there are GPUs, or on the CPU with DSMOE_EVAL_IN_CHILD=1."""
    return torch.cuda.is_available() or os.environ.get("DSMOE_EVAL_IN_CHILD") == "1"


def child_processes(workers: int) -> ProcessPoolExecutor:
    """A pool of spawned processes, a fresh one for every call: a process that has used one GPU never takes a call
    for another (its CUDA context and cached memory would stay where they were)."""
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_exit_with_parent,
        initargs=(os.getpid(),),
        max_tasks_per_child=1,
    )


def _exit_with_parent(parent: int) -> None:
    """In the child: stop when the driver is gone (killed by SIGTERM, say), not finish an evaluation nobody reads."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def on_each_device(
    fn: Callable[..., T], calls: list[tuple], devices: list[torch.device], done: Callable[[int, T], None]
) -> None:
    """``fn(*args, device)`` for each ``args`` in calls, one call per device at a time, each device taking the next
    call as it comes free; ``done(i, result)`` as each call ``i`` finishes. On GPUs each call runs in a spawned child
    process (see :func:`on_the_gpus`), so several run at once; on the CPU one after another in this process."""
    if not in_child_processes():
        for i, args in enumerate(calls):
            done(i, fn(*args, devices[0]))
        return
    free, waiting, running, errors = list(devices), list(enumerate(calls)), {}, []
    with child_processes(len(devices)) as pool:
        while running or (waiting and not errors):
            while waiting and free and not errors:  # after an error: no new call, the running ones finish
                (i, args), device = waiting.pop(0), free.pop(0)
                running[pool.submit(fn, *args, device)] = i, device
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                i, device = running.pop(future)
                free.append(device)
                if future.exception() is not None:
                    errors.append(future.exception())
                else:
                    done(i, future.result())  # kept (cached) even if another call fails
    if errors:
        raise errors[0]


def replicas(model: torch.nn.Module, devices: list[torch.device]) -> list[torch.nn.Module]:
    """The model on its device plus a copy on each further device (data-parallel evaluation in one process)."""
    return [model] + [copy.deepcopy(model).to(d) for d in devices[1:]]


@torch.no_grad()
def evaluate_model(
    models: torch.nn.Module | list[torch.nn.Module], windows: dict[str, torch.Tensor], batch_size: int
) -> dict[str, Any]:
    """PPL per source and overall (token-weighted); params; activated params (measured here for a method whose
    activation is dynamic, DSMoE's, with its mean active experts per layer per source for Fig. 3); Table 1's
    configuration. ``models``: one model, or replicas on several devices that share the batches (the activation
    counts of the replicas are summed)."""
    models = models if isinstance(models, list) else [models]
    model = models[0]
    method = method_of_model(model)
    dynamic = method.dynamic
    out: dict[str, Any] = {"ppl_per_source": {}, "active_per_layer": {}}
    nll, tokens = 0.0, 0
    for name, w in windows.items():
        if dynamic:
            for m in models:
                dynamic.reset(m)
        result = perplexity(models, list(w), batch_size, desc=name, count_only=dynamic.count_only if dynamic else None)
        nll, tokens = nll + result.nll_sum, tokens + result.tokens
        out["ppl_per_source"][name] = result.ppl
        out.setdefault("tokens_per_source", {})[name] = result.tokens
        if dynamic:
            dynamic.merge(model, models[1:])
            stats = dynamic.stats(model, False, None)
            out["active_per_layer"][name] = stats.mean_active_per_layer
            out.setdefault("activated_per_source", {})[name] = stats.activated_params
            out.setdefault("routed_per_source", {})[name] = stats.tokens  # every real position, the first included
    out["ppl"] = math.exp(nll / tokens)
    out["eval_tokens"] = tokens
    out["params"] = count_params(model)
    if dynamic:  # means over every routed position of every source: each source weighted by its positions
        routed = out.pop("routed_per_source")
        share = {name: t / sum(routed.values()) for name, t in routed.items()}
        out["activated_params"] = sum(share[k] * v for k, v in out.pop("activated_per_source").items())
        per_layer = [
            sum(share[k] * v[i] for k, v in out["active_per_layer"].items())
            for i in range(len(next(iter(out["active_per_layer"].values()))))
        ]
        out["mean_active_per_layer"] = per_layer
        out["mean_active"] = sum(per_layer) / len(per_layer)
    else:
        out["activated_params"] = method.activated_params(model)
    out["configuration"] = method.describe(model)
    return out


def evaluate(
    scale: str,
    run: str,
    tau: float | None = None,
    model_dir: Path | None = None,
    tag: str = "",
    seed: int = 0,
    rescale: bool = True,
) -> dict[str, Any]:
    """Cached evaluation of a run's final model ("dense": the original model, untrained) at the scale's
    validation windows; ``tau`` re-thresholds a DSMoE model first (Table 4, Fig. 2), ``rescale=False`` drops eq. 8's
    n/#active (Fig. 2); ``seed``: which repetition."""
    from dsmoe.models import load_tokenizer

    sc = scale_config(scale)
    if run == "dense":
        source, cfg_model, summary = sc.base.model, sc.base.model, {"tokens": 0, "global_step": 0}
        method, trained_seed = "dense", ""
    else:
        final = model_dir or ensure_run(scale, run, seed)
        source, cfg = str(final), run_config(scale, run, seed)
        cfg_model, method, trained_seed = cfg.model, cfg.method, cfg.trainer.seed
        summary_file = run_dir(cfg) / "train_summary.json"
        summary = read_json(summary_file) if model_dir is None or summary_file.exists() else {}
        if model_dir is not None:  # an export of the run: its own tokens and steps, but trained where the run was
            summary = {"hardware": summary.get("hardware", "unknown")} if summary else {}
    name = f"eval{tag}" + (f"_tau{tau:g}" if tau is not None else "") + ("" if rescale else "_norescale") + ".json"

    def compute() -> dict[str, Any]:
        windows = validation_windows(scale, load_tokenizer(source))  # on the CPU, here: read once per data config
        info = runs_root(scale) / run_name(run, seed) / "init_model" / "dense_params.json"
        fields = {
            "model": cfg_model,
            "method": method,
            "tokens": summary.get("tokens", ""),
            "steps": summary.get("global_step", ""),
            "seed": trained_seed,
            "protocol": f"PPL: {eval_protocol(scale)}",
        }
        dense = None if run == "dense" else read_json(info)["dense_params"]
        packed = {name: packed_sequences(w) for name, w in windows.items()}
        spec = (source, run, packed, sc.eval.batch_size, tau, rescale, dense, fields, summary.get("hardware"))
        return on_the_gpus(measure, *spec)

    folder = runs_root(scale) / (run if run == "dense" else run_name(run, seed))
    return cached(folder / name, compute, {**evaluation_settings(scale, source), "tau": tau, "rescale": rescale})


def packed_sequences(sequences: Any) -> tuple[torch.Tensor, list[int]]:
    """Held-out sequences (a [N, L] tensor or a list of 1-D ones) as one flat tensor and their lengths: what goes to
    a child process as one shared-memory file, not one per document (20,000 at the paper's scales)."""
    sequences = list(sequences)
    return torch.cat([s.reshape(-1) for s in sequences]), [s.numel() for s in sequences]


def unpacked_sequences(packed: tuple[torch.Tensor, list[int]]) -> list[torch.Tensor]:
    flat, lengths = packed
    return list(flat.split(lengths))


def measure(
    source: str,
    run: str,
    packed_windows: dict[str, tuple[torch.Tensor, list[int]]],
    batch_size: int,
    tau: float | None,
    rescale: bool,
    dense_params: int | None,
    fields: dict[str, Any],
    trained_on: str | None,
) -> dict[str, Any]:
    """:func:`evaluate`'s measurement of one model (see there) on the held-out sequences (:func:`packed_sequences`),
    with its provenance ``fields``; ``dense_params``: the dense model's count (None: this model is the dense one);
    ``trained_on``: where the run trained."""
    windows = {name: unpacked_sequences(packed) for name, packed in packed_windows.items()}
    model, _ = load_for_eval(source)
    dynamic = method_of_model(model).dynamic
    if (tau is not None or not rescale) and dynamic is None:
        raise ValueError(f"run {run!r} has no dynamic activation: tau and rescale apply to DSMoE models only")
    if dynamic:
        if tau is not None:
            dynamic.set_threshold(model, tau)
        dynamic.set_rescale(model, rescale)
    dense_total = dense_params if dense_params is not None else count_params(model)
    result = evaluate_model(replicas(model, eval_devices()), windows, batch_size)
    result["activated_fraction"] = result["activated_params"] / dense_total
    result["dense_params"] = dense_total
    result["tau"] = tau if tau is not None else (dynamic.threshold(model) if dynamic else "")
    evaluated_on = f"{hardware()}, {str(eval_dtype()).removeprefix('torch.')}"  # e.g. 8x NVIDIA H100 ..., bfloat16
    where = f"trained on {trained_on}; evaluated on {evaluated_on}" if trained_on else evaluated_on
    result["provenance"] = provenance(**fields, tau=result["tau"], hardware=where)
    return result


def benchmarks(scale: str, runs: list[tuple[str, int]], limit: int | None) -> dict[tuple[str, int], dict[str, dict]]:
    """Cached Table 2 benchmarks (lm-eval) of each (run, seed)'s final model ("dense": the original model), keyed by
    (run, seed), with the scale's eval settings (batch size, generation length). The runs are trained first where
    missing; the missing scores are then computed one model per GPU, as many at once as there are GPUs (bf16), or
    on the CPU."""
    sc = scale_config(scale)
    jobs = []
    for run, seed in runs:
        source = sc.base.model if run == "dense" else str(ensure_run(scale, run, seed))
        folder = runs_root(scale) / (run if run == "dense" else run_name(run, seed))
        settings = {
            "model": model_fingerprint(source),
            "limit": limit,
            "batch_size": sc.eval.batch_size,
            "max_gen_toks": sc.eval.max_gen_toks,
            "evaluated_on": evaluation_precision(),
            "log_probs": "float32",  # whatever the model's dtype (earlier: lm-eval's default, the model's)
        }
        jobs.append((folder / f"benchmarks_limit{limit}.json", settings, source))
    results = [stored_result(path, settings) for path, settings, _ in jobs]
    missing = [i for i, result in enumerate(results) if result is None]
    calls = [(jobs[i][2], limit, sc.eval.batch_size, sc.eval.max_gen_toks) for i in missing]

    def done(k: int, value: dict[str, dict]) -> None:
        path, settings, _ = jobs[missing[k]]
        store_result(path, value, settings)
        results[missing[k]] = value

    on_each_device(run_benchmarks_of, calls, eval_devices(), done)
    return dict(zip(runs, results, strict=True))


def run_benchmarks_of(
    source: str, limit: int | None, batch_size: int, max_gen_toks: int, device: torch.device | None = None
) -> dict[str, dict]:
    """Table 2's benchmarks of the model at ``source`` on ``device`` (default: the first GPU in bf16 when there is
    one)."""
    from dsmoe.benchmarks import run_benchmarks

    model, tokenizer = load_for_eval(source, device)
    return run_benchmarks(model, tokenizer, limit=limit, batch_size=batch_size, max_gen_toks=max_gen_toks)


def benchmark_scores(results: list[dict[str, dict]], task: str) -> list[float] | str:
    """A task's scores in percent over the seeds' results, or its status where it did not run (e.g. unavailable)."""
    if results[0][task]["status"] != "ok":
        return results[0][task]["status"]
    return [100 * r[task]["value"] for r in results]


def benchmark_stderr(results: list[dict[str, dict]], task: str) -> float:
    """lm-eval's standard error of a task's score over its items, in points (the mean over the seeds' runs; NaN
    where lm-eval gave none). The seeds score the same items, so this part of the noise does not shrink with them:
    at --limit 20 it is about 10 points."""
    values = [r[task].get("stderr") for r in results]
    return math.nan if any(v is None for v in values) else 100 * sum(values) / len(values)


def parse_scale(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="demo", help=f"one of {SCALES} (demo: embedded model on CPU, the default)")
    parser.add_argument(
        "--limit", type=int, default=None, help="benchmark items per task (default: the scale's eval.benchmark_limit)"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="repetitions of every trained run (default: the scale's)"
    )
    args = scale_arguments(parser.parse_args(argv))
    for folder in (runs_root(args.scale), results_dir(args.scale)):  # not found out after hours of training
        check_writable(folder)
    return args


def check_writable(folder: Path) -> None:
    """Create ``folder`` if missing; a ValueError naming it where it cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create {folder}: {error.strerror} (DSMOE_RUNS and DSMOE_RESULTS move it)") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write to {folder} (DSMOE_RUNS and DSMOE_RESULTS move it)")


def scale_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``--scale`` checked and ``--limit`` / ``--seeds`` checked, their defaults the scale's eval
    settings (the targets' and ``--plan``'s command lines)."""
    sc = scale_config(args.scale)  # fail early on an unknown scale
    eval_dtype()  # and on a bad DSMOE_EVAL_DTYPE, before any run trains
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of benchmark items per task, got {args.limit}")
    args.limit = args.limit if args.limit is not None else sc.eval.get("benchmark_limit")
    args.seeds = args.seeds if args.seeds is not None else int(sc.eval.get("seeds", 1))
    if args.seeds < 1:
        raise ValueError(f"--seeds must be a positive number of repetitions, got {args.seeds}")
    return args


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation; the sd of a single value is undefined: NaN (a blank cell in the
    CSVs), not 0, which would claim a spread of zero that no second seed measured."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def plus_minus(mean: float, sd: float, digits: int = 3) -> str:
    """``mean ± sd`` for printing, or the mean alone where the sd is undefined (one seed)."""
    return f"{mean:.{digits}f}" if math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def with_spread(row: dict[str, Any], name: str, values: list[float]) -> dict[str, Any]:
    """Add ``name`` (the mean over seeds) and ``name sd`` to a row."""
    row[name], row[f"{name} sd"] = mean_sd(values)
    return row


def seeds_provenance(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The provenance of a row aggregated over seeds: the first's, with every seed listed."""
    first = dict(results[0]["provenance"])
    first["seed"] = ",".join(str(r["provenance"]["seed"]) for r in results)
    return first


def table_row(results: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """Table 1's columns (mean and sd over the seeds' results, and their number) plus per-source PPL and the
    provenance columns."""
    first = results[0]
    row = {
        "Model": label,
        "Configuration": " | ".join(dict.fromkeys(r["configuration"] for r in results)),
    }
    # a baseline matched seed by seed (LLM-Pruner's widths) has another size per seed: both counts are means
    for column, key in (("Params", "params"), ("Activated Params", "activated_params")):
        with_spread(row, column, [r[key] for r in results])
        row[column] = round(row[column])
    with_spread(row, "Activated %", [100 * r["activated_fraction"] for r in results])
    with_spread(row, "PPL", [r["ppl"] for r in results])
    row["seeds"] = len(results)
    for source in first["ppl_per_source"]:
        with_spread(row, f"PPL {source}", [r["ppl_per_source"][source] for r in results])
    row.update(seeds_provenance(results))
    return row
