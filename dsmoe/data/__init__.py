"""Continued pre-training data (paper §5.1): the embedded offline corpus and the LightningDataModule.

Names are imported lazily so that ``python -m dsmoe.data.corpus`` runs the module only once.
"""

from importlib import import_module

_EXPORTS = {
    "DOMAINS": "corpus",
    "build_corpus": "corpus",
    "corpus_manifest": "corpus",
    "corpus_sources": "corpus",
    "PAPER_SOURCES": "datamodule",
    "DataConfig": "datamodule",
    "MixtureStream": "datamodule",
    "PretrainDataModule": "datamodule",
    "SourceConfig": "datamodule",
    "document_separator_id": "datamodule",
    "packed_eval_windows": "datamodule",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dsmoe.data' has no attribute {name!r}")
    return getattr(import_module(f"dsmoe.data.{_EXPORTS[name]}"), name)
