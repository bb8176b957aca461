"""Every prompt template by name: what models.registry's TaskSpec.template names, and the
built-in templates a user may pick (``Reranker(model, template="prism")``)."""
from pathlib import Path
from typing import Optional

from engine.prompts.qwen3_vl import Qwen3VLEmbedTemplate, Qwen3VLRerankTemplate
from engine.prompts.templates import (
    CrossEncoderTemplate,
    KaLMRerankTemplate,
    PrismRerankTemplate,
    Qwen3EmbedTemplate,
    Qwen3RerankTemplate,
    SentenceTransformerEmbedTemplate,
    XLMRobertaPairTemplate,
)
from engine.prompts.user_template import PromptTemplate, QueritTemplate

TEMPLATES = {cls.__name__: cls for cls in (
    Qwen3RerankTemplate, Qwen3EmbedTemplate, PrismRerankTemplate, CrossEncoderTemplate, XLMRobertaPairTemplate,
    SentenceTransformerEmbedTemplate, KaLMRerankTemplate, QueritTemplate, PromptTemplate, Qwen3VLRerankTemplate,
    Qwen3VLEmbedTemplate)}

# Prompt templates a user may pick by name (``Reranker(model, template="prism")``) on an
# architecture whose head fits them; a model whose name says "prism" gets the Prism template.
TEMPLATE_ALIASES = {"prism": "PrismRerankTemplate", "qwen3": "Qwen3RerankTemplate", "querit": "QueritTemplate"}
_ALIAS_HEADS = {"prism": "yes_no", "qwen3": "yes_no", "querit": "two_way"}
# Heads whose models read a prompt a user may write (a Jinja file or a format string).
_PROMPT_HEADS = ("yes_no", "two_way")



def _is_file(path: str) -> bool:
    return len(path) < 4096 and "\n" not in path and Path(path).is_file()


def template_class(spec, task: str, template: Optional[str] = None, name: str = ""):
    """The template class of a task.

    ``template`` overrides the task's default on rerankers whose head reads a prompt: a built-in
    name of TEMPLATE_ALIASES, else a user's template (a Jinja file or a format string, see
    engine.prompts.user_template.user_template), served by PromptTemplate. A Qwen3 yes/no reranker
    named "prism" gets the Prism template.
    """
    head = spec.tasks[task].head
    chosen = spec.tasks[task].template
    if template is not None:
        if head not in _PROMPT_HEADS:
            raise ValueError(f"template={template!r} applies to yes/no rerankers and 2-way ones (Querit); "
                             f"{spec.cls} ({task}) is neither")
        if template in TEMPLATE_ALIASES:
            if _ALIAS_HEADS[template] != head:
                raise ValueError(f"template={template!r} is for {_ALIAS_HEADS[template]} heads; "
                                 f"{spec.cls} ({task}) has a {head} head")
            chosen = TEMPLATE_ALIASES[template]
        elif "{" in template or _is_file(template):
            chosen = "PromptTemplate"
        else:
            raise ValueError(f"template must be one of {sorted(TEMPLATE_ALIASES)}, a Jinja template file or a "
                             f"format string with {{document}}; got {template!r}")
    elif head == "yes_no" and "prism" in name.lower():
        chosen = TEMPLATE_ALIASES["prism"]
    return TEMPLATES[chosen]
