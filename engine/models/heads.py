"""Heads: what a model's last hidden states become (a relevance score or an embedding).

Heads read only the rows they need (the last token of each sequence) and apply
the model's final norm to those rows alone.
"""
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.context import BatchContext
from engine.prompts.tokenizer import token_id
from engine.weights import WeightError, read_json, read_rows, read_tensor

# Heads take (hidden [T, H], residual [T, H] or None, ctx, model) and return (logit, score):
#   relevance heads: the exact pre-activation logit [n] and the score [n], both fp32 (``raw_scores``
#   returns the logit itself; nothing downstream inverts a sigmoid);
#   pooling heads: (None, embedding [n, H] fp32).
# A builder gets (config dict, tokenizer, checkpoint index) and returns the head module.


class Head(nn.Module):
    """What every head declares. ``reads_last_token``: it reads only each sequence's last row,
    so a model may compute the last layer for those rows alone. ``checkpoint_names``: tensors of
    the checkpoint that belong to the head (read by it, or known to be unused), not to the model."""

    reads_last_token = False
    gives_logit = True
    checkpoint_names: frozenset = frozenset()


def build_yes_no_head(config: dict, tokenizer, index, label_tokens=("yes", "no")) -> "YesNoHead":
    """Fold the LM head's yes/no rows (or the tied embedding's) into one fp32 vector.
    ``label_tokens``: the (positive, negative) answers, for models that say "true"/"false"."""
    if len(label_tokens) != 2:
        raise ValueError(f"label_tokens must be two tokens (positive, negative), got {list(label_tokens)}")
    try:
        yes, no = token_id(tokenizer, label_tokens[0]), token_id(tokenizer, label_tokens[1])
    except ValueError as e:
        raise ValueError(f"label tokens: {e}") from None
    # T5Gemma2 (KaLM) names its head lm_head.out_proj and its shared embedding model.encoder.embed_tokens.
    name = next((n for n in ("lm_head.weight", "model.lm_head.weight", "lm_head.out_proj.weight") if n in index), None)
    if name is None:
        tied = config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings", False))
        if not tied:
            raise WeightError("missing tensor lm_head.weight (tie_word_embeddings is false)")
        # Multimodal checkpoints (Qwen3.5) nest the decoder under model.language_model.
        name = next(n for n in ("model.embed_tokens.weight", "embed_tokens.weight",
                                "model.language_model.embed_tokens.weight",
                                "model.encoder.embed_tokens.weight") if n in index)
    rows = read_rows(index[name], name, [yes, no])  # two rows, not the vocabulary
    return YesNoHead(rows[0], rows[1])


class YesNoHead(Head):
    """score = sigmoid(norm(h_last) . (W[yes] - W[no])), all fp32.

    Equal to softmax([l_no, l_yes])[1] of the full LM head (vLLM's
    ``from_2_way_softmax``), without computing the vocabulary.
    """

    reads_last_token = True

    def __init__(self, w_yes: torch.Tensor, w_no: torch.Tensor):
        super().__init__()
        self.register_buffer("w", (w_yes.float() - w_no.float()).contiguous())  # [H] fp32

    def forward(self, hidden, residual, ctx: BatchContext, model) -> torch.Tensor:
        norm = model.norm
        logit, score = kernels.yes_no_head(
            hidden, ctx.last_index, norm.weight, self.w, norm.eps, residual=residual, offset=norm.offset,
        )
        return logit, score  # [n] fp32 each: l_yes - l_no and its sigmoid


class LastTokenPooling(Head):
    """The final-normed hidden state of each sequence's last token, in fp32."""

    reads_last_token = True
    gives_logit = False

    def forward(self, hidden, residual, ctx: BatchContext, model) -> torch.Tensor:
        norm = model.norm
        x = hidden[ctx.last_index]
        res = residual[ctx.last_index] if residual is not None else None
        out, _ = kernels.rms_norm(x, norm.weight, norm.eps, residual=res, offset=norm.offset)
        return None, out.float()  # [n, H]


# --- BERT / XLM-RoBERTa cross-encoders and sentence-transformers embedders ---------------------

_ENCODER_PREFIXES = ("", "bert.", "roberta.")
_CE_ACTIVATIONS = {
    "Identity": lambda x: x,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Softmax": lambda x: torch.softmax(x, dim=-1),
}


def _find(index, stem: str) -> Optional[str]:
    """The checkpoint name of ``stem`` under any encoder prefix (``pooler.dense`` or ``bert.pooler.dense``)."""
    return next((p + stem for p in _ENCODER_PREFIXES if p + stem + ".weight" in index), None)


def _cross_encoder_activation(config: dict, num_labels: int):
    """sentence-transformers' CrossEncoder default: the activation the config declares, else
    Sigmoid for one label and Identity for several (no softmax unless declared)."""
    path = (config.get("sentence_transformers") or {}).get("activation_fn") \
        or config.get("sbert_ce_default_activation_function")
    if path and path.startswith("torch."):
        name = path.rsplit(".", 1)[-1]
        if name not in _CE_ACTIVATIONS:
            raise NotImplementedError(f"cross-encoder activation {path!r} is not supported; "
                                      f"supported: {sorted(_CE_ACTIVATIONS)}")
        return _CE_ACTIVATIONS[name]
    return torch.sigmoid if num_labels == 1 else _CE_ACTIVATIONS["Identity"]


def _label_column(config: dict, num_labels: int) -> Optional[int]:
    if num_labels == 1:
        return None
    labels = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    hits = [i for i, name in labels.items() if name.lower().startswith("entail")]
    if len(hits) != 1:
        raise ValueError(f"a {num_labels}-label cross-encoder needs one 'entailment' label in id2label "
                         f"to score pairs, got {labels}")
    return hits[0]


def build_classifier_head(config: dict, tokenizer, index, **_) -> "ClassificationHead":
    """BERT: ``classifier(tanh(pooler.dense(h)))``; RoBERTa: ``out_proj(tanh(dense(h)))``, on the first token."""
    if "classifier.out_proj.weight" in index:
        dense, out = "classifier.dense", "classifier.out_proj"
        unused = [n for n in index if n.startswith(("roberta.pooler.", "pooler."))]  # XLM-R never uses it
    else:
        dense, out = _find(index, "pooler.dense"), "classifier"
        if dense is None or "classifier.weight" not in index:
            raise WeightError("missing tensor(s) for the classification head: expected pooler.dense.* and "
                              "classifier.* (BERT) or classifier.dense.* and classifier.out_proj.* (RoBERTa)")
        unused = []
    names = [f"{m}.{p}" for m in (dense, out) for p in ("weight", "bias")]
    for n in names:
        if n not in index:
            raise WeightError(f"missing tensor {n} for the classification head")
    w = {n: read_tensor(index[n], n).float() for n in names}
    num_labels = w[f"{out}.weight"].shape[0]
    head = ClassificationHead(w[f"{dense}.weight"], w[f"{dense}.bias"], w[f"{out}.weight"], w[f"{out}.bias"],
                              _cross_encoder_activation(config, num_labels), _label_column(config, num_labels))
    head.checkpoint_names = frozenset(names) | frozenset(unused)
    return head


class ClassificationHead(Head):
    """Logits of the first token (``[CLS]`` / ``<s>``), in fp32, and one score per pair: the
    activation, then the entailment column for NLI models. The logit returned is that column's
    pre-activation logit (the only one for single-label models)."""

    def __init__(self, dense_w, dense_b, out_w, out_b, activation, column: Optional[int]):
        super().__init__()
        for name, t in (("dense_w", dense_w), ("dense_b", dense_b), ("out_w", out_w), ("out_b", out_b)):
            self.register_buffer(name, t.contiguous())
        self.activation, self.column = activation, column

    def forward(self, hidden, residual, ctx: BatchContext, model) -> torch.Tensor:
        h = hidden[ctx.cu_seqlens[:-1].long()].float()  # [n, H]
        logits = F.linear(torch.tanh(F.linear(h, self.dense_w, self.dense_b)), self.out_w, self.out_b)  # [n, L]
        scores = self.activation(logits)
        col = 0 if self.column is None else self.column
        return logits[:, col], scores[:, col]  # [n] each


_POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def _read_json(path):
    return read_json(path, expect=None)


def build_pooling_head(config: dict, tokenizer, index, **_) -> "PoolingHead":
    """Pooling and Normalize as the sentence-transformers folder declares (``modules.json``,
    ``1_Pooling/config.json``); a plain transformers folder gets mean pooling, like sentence-transformers."""
    folder = Path(next(iter(index.values())).file).parent
    modes, normalize = ("mean",), False
    if (folder / "modules.json").is_file():
        for m in _read_json(folder / "modules.json"):
            kind = m["type"].rsplit(".", 1)[-1]
            if kind == "Normalize":
                normalize = True
            elif kind == "Pooling":
                pcfg = _read_json(folder / m["path"] / "config.json")
                if pcfg.get("include_prompt", True) is False:
                    raise NotImplementedError("Pooling with include_prompt=false is not supported")
                mode = pcfg.get("pooling_mode") or tuple(v for k, v in _LEGACY_POOLING_KEYS.items() if pcfg.get(k))
                modes = (mode,) if isinstance(mode, str) else tuple(mode) or ("mean",)
            elif kind != "Transformer":
                raise NotImplementedError(f"sentence-transformers module {m['type']} is not supported "
                                          f"(supported: Transformer, Pooling, Normalize)")
    for mode in modes:
        if mode not in _POOLING_MODES:
            raise NotImplementedError(f"pooling mode {mode!r} is not supported; supported: {_POOLING_MODES}")
    head = PoolingHead(modes, normalize)
    # BertModel checkpoints carry a pooler that sentence-transformers never uses.
    head.checkpoint_names = frozenset(n for n in index if n.startswith(tuple(p + "pooler." for p in _ENCODER_PREFIXES)))
    return head


class PoolingHead(Head):
    """sentence-transformers Pooling over packed sequences (modes concatenated in order), then Normalize."""

    gives_logit = False

    def __init__(self, modes, normalize: bool):
        super().__init__()
        self.modes, self.normalize = tuple(modes), normalize

    def forward(self, hidden, residual, ctx: BatchContext, model) -> torch.Tensor:
        if self.modes == ("mean",):  # the common case (all-MiniLM and most BERT embedders): one fused op
            return None, kernels.mean_pool(hidden, ctx.cu_seqlens, self.normalize)
        h = hidden.float()  # [T, H]
        t, n = h.shape[0], ctx.num_seqs
        cu = ctx.cu_seqlens.long()
        lens = (cu[1:] - cu[:-1]).float()[:, None]  # [n, 1]
        seq = torch.repeat_interleave(torch.arange(n, device=h.device), cu[1:] - cu[:-1], output_size=t)  # [T]

        def seg_sum(x):
            return torch.zeros(n, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, seq, x)

        outs = []
        for mode in self.modes:
            if mode == "cls":
                outs.append(h[cu[:-1]])
            elif mode == "lasttoken":
                outs.append(h[ctx.last_index])
            elif mode == "max":
                init = torch.full((n, h.shape[1]), float("-inf"), device=h.device)
                outs.append(init.scatter_reduce_(0, seq[:, None].expand_as(h), h, "amax"))
            elif mode == "mean":
                outs.append(seg_sum(h) / lens)
            elif mode == "mean_sqrt_len_tokens":
                outs.append(seg_sum(h) / lens.sqrt())
            else:  # weightedmean: token i of a sequence weighs i + 1
                w = (ctx.positions + 1).float()[:, None]
                outs.append(seg_sum(h * w) / seg_sum(w))
        emb = torch.cat(outs, dim=-1)
        return None, (F.normalize(emb, p=2, dim=-1) if self.normalize else emb)  # [n, k * H]


def matryoshka(emb, dimensions: Optional[int], normalize: bool = True):
    """Truncate to ``dimensions`` first, then L2-normalise (Matryoshka order).

    ``emb``: a tensor, or a numpy array (the callers' side of the engine works in numpy: a torch
    op big enough to run in parallel would start a second OpenMP team beside the engine thread's,
    and with more OpenMP threads than cores libgomp stops spinning between parallel regions,
    which slows a one-text forward markedly; bench/RESULTS.md has the figure)."""
    if dimensions is not None:
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions <= 0:
            raise ValueError(f"dimensions must be a positive integer, got {dimensions!r}")
        if dimensions > emb.shape[-1]:
            raise ValueError(f"dimensions={dimensions} is larger than the embedding size {emb.shape[-1]}")
        emb = emb[..., :dimensions]
    if not normalize:
        return emb
    if isinstance(emb, np.ndarray):  # F.normalize's x / max(||x||, 1e-12)
        return emb / np.maximum(np.sqrt(np.square(emb, dtype=np.float32).sum(-1, keepdims=True)), 1e-12)
    return F.normalize(emb, p=2, dim=-1)


def build_two_way_head(config: dict, tokenizer, index, **_) -> "TwoWayHead":
    """Querit-Reranker's ``head = Linear(hidden, 2)`` (with bias), read from ``head.*``."""
    names = ("head.weight", "head.bias")
    for n in names:
        if n not in index:
            raise WeightError(f"missing tensor {n} for the 2-way head")
    w, b = (read_tensor(index[n], n).float() for n in names)
    if w.dim() != 2 or w.shape[0] != 2 or b.shape != (2,):
        raise WeightError(f"head.weight must be [2, hidden] and head.bias [2], got {list(w.shape)} and {list(b.shape)}")
    head = TwoWayHead(w, b)
    head.checkpoint_names = frozenset(names)
    return head


class TwoWayHead(Head):
    """Querit: z = head(norm(h_last)) in fp32; score = softmax(z)[1] - softmax(z)[0] in [-1, 1],
    logit = z1 - z0 (score = tanh(logit / 2))."""

    reads_last_token = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.contiguous())  # [2, H] fp32
        self.register_buffer("bias", bias.contiguous())  # [2] fp32

    def forward(self, hidden, residual, ctx: BatchContext, model):
        norm = model.norm
        res = residual[ctx.last_index] if residual is not None else None
        h, _ = kernels.rms_norm(hidden[ctx.last_index], norm.weight, norm.eps, residual=res, offset=norm.offset)
        z = F.linear(h.float(), self.weight, self.bias)  # [n, 2]
        p = torch.softmax(z, dim=-1)
        return z[:, 1] - z[:, 0], p[:, 1] - p[:, 0]


HEAD_BUILDERS = {
    "yes_no": build_yes_no_head,
    "two_way": build_two_way_head,
    "last_token": lambda config, tokenizer, index, **_: LastTokenPooling(),
    "classifier": build_classifier_head,
    "pooling": build_pooling_head,
}
