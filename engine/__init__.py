"""An inference engine for rerankers and embedders."""
__all__ = ["Reranker", "Embedder", "Classifier", "EngineConfig", "run_batch"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: ``import engine`` (and so ``rerank-engine --help``) does not import torch until a class is used.
    if name in ("Reranker", "Embedder"):
        from engine import api

        return getattr(api, name)
    if name == "EngineConfig":  # no torch: plain dataclasses
        from engine.config import EngineConfig

        return EngineConfig
    if name == "run_batch":  # Ray Data offline jobs (the ray extra)
        from engine.scaleout.data import run_batch

        return run_batch
    if name == "Classifier":
        from engine.classifier import Classifier

        return Classifier
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
