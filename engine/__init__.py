"""An inference engine for rerankers and embedders."""
from engine.api import Embedder, Reranker
from engine.classifier import Classifier

__all__ = ["Reranker", "Embedder", "Classifier"]
__version__ = "0.1.0"
