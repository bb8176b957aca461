"""Zero-shot text classification with a reranker (as in the BTZSC benchmark).

Each text is the query and each label's description a document; the prediction
is the best-scoring label, or every label at or above ``threshold`` when
``multi_label``. The text is the shared prefix of its pairs, so an LLM
reranker computes it once for all of its labels.

A reranker's scores are probabilities, so ``multi_label`` keeps the labels at
or above 0.5 unless told otherwise. An embedding model's are cosine
similarities, whose useful cut-off depends on the model and the labels (often
0.2-0.5 for all-MiniLM-L6-v2): ``multi_label`` on one needs a ``threshold``.
"""
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from engine.api import Reranker
from engine.config import EngineConfig
from engine.prompts.templates import check_texts

CLASSIFY_INSTRUCTION = "Given a piece of text, retrieve relevant label descriptions that best match the text"
PROBABILITY_THRESHOLD = 0.5  # multi_label's default on a reranker's probabilities

@dataclass(frozen=True)
class LabelSet:
    """Labels checked once per request: their names and the descriptions the reranker scores."""

    names: Tuple[str, ...]
    descriptions: Tuple[str, ...]

    def __iter__(self):  # names, descs = normalize_labels(labels)
        return iter((list(self.names), list(self.descriptions)))


Labels = Union[Sequence[str], Mapping[str, str], LabelSet]


def normalize_labels(labels: Labels) -> LabelSet:
    """The names and descriptions of a list of names or a {name: description} mapping, checked.
    A LabelSet is already checked: it is returned as it is, so each request checks its labels once
    (at the HTTP boundary, or in ``Classifier.classify``)."""
    if isinstance(labels, LabelSet):
        return labels
    if isinstance(labels, str):
        raise TypeError("labels must be a list of strings or a {name: description} mapping, not a string")
    if isinstance(labels, Mapping):
        names, descs = list(labels.keys()), list(labels.values())
    elif not isinstance(labels, (list, tuple)):
        raise TypeError(f"labels must be a list of strings or a {{name: description}} mapping, "
                        f"got {type(labels).__name__}")
    else:
        names = list(labels)
        descs = names
    if not names:
        raise ValueError("labels must not be empty")
    for i, (n, d) in enumerate(zip(names, descs)):
        if not isinstance(n, str):
            raise TypeError(f"labels[{i}] must be a string, got {type(n).__name__}")
        if not isinstance(d, str):
            raise TypeError(f"the description of label {n!r} must be a string, got {type(d).__name__}")
    seen = set()
    for n in names:
        if n in seen:
            raise ValueError(f"duplicate label {n!r}")
        seen.add(n)
    return LabelSet(tuple(names), tuple(descs))


class Classifier:
    """``Classifier(model).classify(texts, labels)`` with any reranker the engine serves."""

    def __init__(self, model=None, reranker: Optional[Reranker] = None, config: Optional[EngineConfig] = None,
                 **options):
        # options: Reranker's keyword arguments (fields of EngineConfig), as is ``config``.
        if isinstance(model, Reranker):  # Classifier(Reranker(...)): share its engine
            model, reranker = None, model if reranker is None else _both()
        elif model is not None and not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"Classifier takes a model (a folder or hub id) or a Reranker, got {type(model).__name__}"
                            + (" (pass Reranker(model) or the model itself)" if hasattr(model, "engine") else ""))
        if reranker is not None and (model is not None or config is not None or options):
            _both()
        self.reranker = reranker if reranker is not None else Reranker(model, config=config, **options)

    def _instruction(self, instruction: Optional[str]) -> Optional[str]:
        if instruction is not None:
            return instruction
        tpl = self.reranker.engine.template
        # Only templates with an instruction slot (LLM rerankers) take the classification instruction.
        return CLASSIFY_INSTRUCTION if tpl.default_instruction is not None and self.reranker.task == "rerank" else None

    def scores(self, texts: Sequence[str], labels: Labels, instruction: Optional[str] = None,
               stats: Optional[dict] = None, cancel=None) -> np.ndarray:
        """``[len(texts), len(labels)]`` scores of every text against every label."""
        if isinstance(texts, str):
            texts = [texts]
        texts = check_texts(texts, "texts")
        names, descs = normalize_labels(labels)  # a LabelSet (from classify) is not checked again
        if not texts:
            return np.zeros((0, len(names)), dtype=np.float32)
        pairs = [(t, d) for t in texts for d in descs]
        s = self.reranker.predict(pairs, instruction=self._instruction(instruction), stats=stats, cancel=cancel)
        return np.asarray(s, dtype=np.float32).reshape(len(texts), len(names))

    def classify(self, texts: Sequence[str], labels: Labels, instruction: Optional[str] = None,
                 multi_label: bool = False, threshold: Optional[float] = None,
                 stats: Optional[dict] = None, cancel=None) -> List[dict]:
        """``[{index, label, scores: {label: score}}]``; ``label`` is a list when ``multi_label``."""
        if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)):
            raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
        if threshold is not None and not np.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold}")
        if multi_label and threshold is None and self.reranker.task == "embed":
            raise ValueError("multi_label with an embedding model needs a threshold: its scores are cosine "
                             "similarities, with no fixed cut-off like a reranker's 0.5 (--threshold in the CLI)")
        labels = normalize_labels(labels)
        names = list(labels.names)
        s = self.scores(texts, labels, instruction, stats, cancel)
        out = []
        for i, row in enumerate(s):
            scores: Dict[str, float] = {n: float(v) for n, v in zip(names, row)}
            if multi_label:
                t = PROBABILITY_THRESHOLD if threshold is None else float(threshold)
                label = [n for n in names if scores[n] >= t]
            else:
                label = names[int(np.argmax(row))]
                if threshold is not None and scores[label] < threshold:
                    label = None  # nothing is confident enough
            out.append({"index": i, "label": label, "scores": scores})
        return out


def _both():
    raise ValueError("Classifier takes a reranker, or a model and its options, not both")
