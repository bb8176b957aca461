"""An inference engine for rerankers and embedders."""
from engine.api import Embedder, Reranker

__all__ = ["Reranker", "Embedder"]
__version__ = "0.1.0"
