"""Continued pre-training data (paper §5.1): sources, configuration, files, the training stream, the
LightningDataModule and the embedded offline corpus.

Names are imported lazily so that ``python -m dsmoe.data.corpus`` runs the module only once.
"""

from importlib import import_module

_EXPORTS = {
    "DOMAINS": "corpus",
    "build_corpus": "corpus",
    "corpus_manifest": "corpus",
    "PAPER_SOURCES": "sources",
    "SourceConfig": "sources",
    "resolve_files": "sources",
    "DataConfig": "config",
    "check_data_files": "config",
    "DataFileError": "files",
    "validation_sample": "holdout",
    "MixtureStream": "stream",
    "WindowStream": "stream",
    "prepare_sources": "stream",
    "PretrainDataModule": "datamodule",
    "document_separator_id": "tokens",
    "packed_eval_windows": "tokens",
    "document_eval_sequences": "tokens",
    "tokenize_documents": "tokens",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dsmoe.data' has no attribute {name!r}")
    return getattr(import_module(f"dsmoe.data.{_EXPORTS[name]}"), name)
