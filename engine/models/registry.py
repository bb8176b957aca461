"""config.json ``architectures`` (+ task) -> model class, head and the name of its prompt template.

A plain dict, modules imported lazily (vLLM's registry). Aliases share one
implementation. An unknown architecture lists the supported ones.
"""
import importlib
import logging
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

log = logging.getLogger("engine")

TASKS = ("rerank", "embed")


@dataclass(frozen=True)
class TaskSpec:
    head: str  # a key of engine.models.heads.HEAD_BUILDERS: "yes_no" | "last_token" | "classifier" | "pooling"
    template: str  # a key of engine.prompts.registry.TEMPLATES


@dataclass(frozen=True)
class ArchSpec:
    module: str  # engine.models.<module>
    cls: str
    tasks: Dict[str, TaskSpec]


_QWEN3_TASKS = {
    "rerank": TaskSpec(head="yes_no", template="Qwen3RerankTemplate"),
    "embed": TaskSpec(head="last_token", template="Qwen3EmbedTemplate"),
}

_ST_EMBED = {"embed": TaskSpec(head="pooling", template="SentenceTransformerEmbedTemplate")}

_PRISM_TASKS = {"rerank": TaskSpec(head="yes_no", template="PrismRerankTemplate")}

_QWEN3_VL_TASKS = {
    "rerank": TaskSpec(head="yes_no", template="Qwen3VLRerankTemplate"),
    "embed": TaskSpec(head="last_token", template="Qwen3VLEmbedTemplate"),
}

ARCHITECTURES: Dict[str, ArchSpec] = {
    "Qwen3ForCausalLM": ArchSpec("qwen3", "Qwen3Model", _QWEN3_TASKS),
    "Qwen3Model": ArchSpec("qwen3", "Qwen3Model", {"embed": _QWEN3_TASKS["embed"]}),
    # BERT and XLM-RoBERTa share one encoder; they differ in positions, head and truncation.
    "BertModel": ArchSpec("bert", "BertModel", _ST_EMBED),
    "BertForSequenceClassification": ArchSpec(
        "bert", "BertModel", {"rerank": TaskSpec(head="classifier", template="CrossEncoderTemplate")}),
    "XLMRobertaModel": ArchSpec("bert", "BertModel", _ST_EMBED),
    "XLMRobertaForSequenceClassification": ArchSpec(
        "bert", "BertModel", {"rerank": TaskSpec(head="classifier", template="XLMRobertaPairTemplate")}),
    # Prism-Reranker: unchanged Qwen3.5 weights (text part of the multimodal checkpoints too).
    "Qwen3_5ForCausalLM": ArchSpec("qwen3_5", "Qwen3_5Model", _PRISM_TASKS),
    "Qwen3_5ForConditionalGeneration": ArchSpec("qwen3_5", "Qwen3_5Model", _PRISM_TASKS),
    # Querit-Reranker: a Qwen3 backbone with a 2-way linear head at the appended [CLS] (model.*, head.*).
    "MLQwen3Model": ArchSpec("qwen3", "Qwen3Model", {"rerank": TaskSpec(head="two_way", template="QueritTemplate")}),
    # KaLM-Reranker-V1: T5Gemma2 encoder-decoder with cached passage encodings (engine/core/passages.py).
    "T5Gemma2ForConditionalGeneration": ArchSpec(
        "t5gemma2", "T5Gemma2Model", {"rerank": TaskSpec(head="yes_no", template="KaLMRerankTemplate")}),
    # Qwen3-VL-Reranker / Qwen3-VL-Embedding: images and text (engine/prompts/inputs.py builds the prompts).
    "Qwen3VLForConditionalGeneration": ArchSpec("qwen3_vl", "Qwen3VLModel", _QWEN3_VL_TASKS),
}

def supported_architectures():
    return sorted(ARCHITECTURES)


def lookup(config: dict, names=()) -> Tuple[str, ArchSpec]:
    """The architecture of a config.json; ``names`` (the checkpoint's tensor names) tells a Qwen3
    checkpoint carrying Querit's 2-way head (``head.weight`` [2, hidden], num_labels 2) apart."""
    archs = config.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2  # transformers' default
            if a in ("Qwen3ForCausalLM", "Qwen3Model") and "head.weight" in names and labels == 2:
                return "MLQwen3Model", ARCHITECTURES["MLQwen3Model"]
            return a, ARCHITECTURES[a]
    raise ValueError(
        f"unsupported architecture {archs or config.get('model_type')!r}; "
        f"supported: {', '.join(supported_architectures())}"
    )


def infer_task(spec: ArchSpec, name: str, task: Optional[str], default: Optional[str] = None) -> str:
    """The task asked for, else the one the model's name implies, else ``default``."""
    short = name.split()[-1] if name else name
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if task == "rerank" and "rerank" not in spec.tasks and "embed" in spec.tasks:
            log.warning("%s is an embedding model: it reranks by the cosine similarity of query and document "
                        "embeddings", short)
            return "embed"
        if task not in spec.tasks:
            raise ValueError(f"{spec.cls} does not support task {task!r}; it supports {sorted(spec.tasks)}")
        return task
    lowered = name.lower()
    if "rerank" in lowered and "rerank" in spec.tasks:
        chosen, why = "rerank", "its name says Reranker"
    elif "embed" in lowered and "embed" in spec.tasks:
        chosen, why = "embed", "its name says Embedding"
    elif default in spec.tasks:
        chosen, why = default, "the caller's default"
    else:
        chosen, why = sorted(spec.tasks)[0], "the only task it supports" if len(spec.tasks) == 1 else "no hint"
        if default == "rerank" and chosen == "embed":  # a Reranker (rank, classify) over an embedding model
            log.info("%s (%s) is an embedding model: it ranks by the cosine similarity of query and document "
                     "embeddings (scores in [-1, 1], not probabilities)", short, spec.cls)
            return chosen
    log.info("%s loaded for task %r (%s)", short, chosen, why)
    return chosen


def model_class(spec: ArchSpec):
    return getattr(importlib.import_module(f"engine.models.{spec.module}"), spec.cls)
