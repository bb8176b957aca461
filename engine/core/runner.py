"""The model runner: owns the device, the weights, the head and the decode cache; runs one step.

Only the engine thread calls it. Each step is plan (the model builds its batch
context from typed sequences), forward, head. It never creates or calls the
scheduler: steps come in, tensors and numbers go back.
"""
import logging
import time
from contextlib import contextmanager
from types import SimpleNamespace
from typing import List, Optional

import torch

import kernels
from engine.core import decode
from engine.core import passages
from engine.models import registry
from engine.core.cache import PassageCache, PrefixKV
from engine.context import build_context
from engine.models.heads import HEAD_BUILDERS
from engine.models.cpu_linear import onednn_available, pack_linears, quantize_linears
from engine.core.request import Cancelled  # noqa: F401 (re-exported for callers)
from engine.core.scheduler import DecodeStep, PassageStep, PrefillStep, PrefixStep, ScoreStep
from engine.weights import checkpoint_index, load_weights

log = logging.getLogger("engine")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = torch.device(device)
    if out.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}); use cpu")
    return out


def pick_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


@contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def compile_model(model: torch.nn.Module):
    """``torch.compile`` of a family's forward as one graph (fullgraph: a graph break is an error)."""
    return torch.compile(model, fullgraph=True, dynamic=True)


class ModelRunner:
    def __init__(self, folder, config_dict: dict, spec: registry.ArchSpec, task: str, device: torch.device,
                 dtype: torch.dtype, tokenizer, label_tokens=None, compile: bool = False,
                 quantize: Optional[str] = None):
        self.folder, self.device, self.dtype = folder, device, dtype
        config = SimpleNamespace(**config_dict)
        index = checkpoint_index(folder)
        # Our layers allocate with torch.empty (no init work); the loader fills every parameter.
        model_cls = registry.model_class(spec)
        with self.device, _default_dtype(self.dtype):
            self.model = model_cls(config)
        self.model.eval()
        # compile: scoring forwards run through torch.compile (one graph: the kernels are torch ops;
        # dynamic shapes, so new batch shapes reuse it). Prefix capture and decode stay eager.
        self.forward = compile_model(self.model) if compile else self.model
        head = spec.tasks[task].head
        if label_tokens is not None and head != "yes_no":
            raise ValueError(f"label_tokens applies to yes/no rerankers; {spec.cls} ({task}) has a {head} head")
        options = {"label_tokens": tuple(label_tokens)} if label_tokens is not None else {}
        self.head = HEAD_BUILDERS[head](config_dict, tokenizer, index, **options).to(self.device)
        # Tensors a head reads (or knows to be unused) are not the model's; all others must load.
        reserved = {"lm_head.weight"} | set(self.head.checkpoint_names)
        skip, skip_prefixes = set(model_cls.ignored_checkpoint_names), tuple(model_cls.ignored_checkpoint_prefixes)
        self.loaded = load_weights(self.model, index, reserved=reserved, strip_prefixes=model_cls.checkpoint_prefixes,
                                   ignore=lambda n: n.endswith("rotary_emb.inv_freq") or n in skip
                                   or (bool(skip_prefixes) and n.startswith(skip_prefixes)))
        if quantize is not None:  # after loading: the int8 weights are made from the loaded fp32 ones
            if device.type != "cpu" or dtype != torch.float32 or compile:
                raise ValueError("quantize='int8' is a CPU mode: device cpu, dtype float32, compile off")
            quantize_linears(self.model, quantize)
        elif self.packs_linears(device, dtype, compile):
            pack_linears(self.model)
        # The last layer may run for the last rows alone when the head reads nothing else.
        self.last_only = self.head.reads_last_token and self.model.supports_last_only
        self.passage_cache: Optional[PassageCache] = None  # set by the engine for encoder-decoders
        self.cache_kv = False
        self.decode_cache: Optional[decode.DecodeCache] = None  # the running decode batch
        self._lm_head: Optional[torch.Tensor] = None

    @staticmethod
    def packs_linears(device: torch.device, dtype: torch.dtype, compile: bool) -> bool:
        """Whether the linears run oneDNN with packed weights (engine/models/cpu_linear.py): on CPU in fp32 or
        bf16 unless ``ENGINE_KERNELS=torch`` (the references) or compiled (inductor does its own)."""
        return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and not compile
                and kernels.kernel_mode() != "torch" and onednn_available())

    def execute(self, step):
        with torch.inference_mode():
            if isinstance(step, ScoreStep):
                return self.score(step)
            if isinstance(step, PrefixStep):
                return self.compute_prefixes([list(k) for k in step.keys])
            if isinstance(step, PassageStep):
                return self.passages(step)
            if isinstance(step, PrefillStep):
                return self.prefill(step)
            if isinstance(step, DecodeStep):
                return self.decode(step)
        raise TypeError(f"unknown step {type(step).__name__}")

    # -- scoring and embedding ------------------------------------------------------------------
    def score(self, step: ScoreStep):
        """One packed forward + head: (logits [n] or None, scores [n] / embeddings [n, H], fwd s, head s)."""
        t0 = time.perf_counter()
        ids, ctx = self.model.plan(step.seqs, self.device, step.prefixes or None, step.prefix_index)
        if self.last_only:
            ctx.last_only = True
            ctx.cu_last = torch.arange(ctx.num_seqs + 1, dtype=torch.int32, device=self.device)
        hidden, residual = self.forward(ids, ctx)
        if ctx.last_only:  # the model returned the last rows only
            ctx.last_index = torch.arange(ctx.num_seqs, device=self.device)
        t1 = time.perf_counter()
        logit, value = self.head(hidden, residual, ctx, self.model)
        value = value.float().cpu().numpy()  # .cpu() syncs the device
        logit = None if logit is None else logit.float().cpu().numpy()
        return logit, value, t1 - t0, time.perf_counter() - t1

    def compute_prefixes(self, heads: List[List[int]]) -> List[PrefixKV]:
        """Run shared prefixes once and keep each layer's K/V: [layers, P, Hkv, D] per prefix."""
        ids, ctx = build_context(heads, self.device)
        ctx.capture_kv = []
        ctx.capture_state = []  # linear-attention layers (Qwen3.5): final states per prefix
        self.model(ids, ctx)
        ks = torch.stack([k for k, _ in ctx.capture_kv])  # [layers, T, Hkv, D]
        vs = torch.stack([v for _, v in ctx.capture_kv])
        convs = torch.stack([c for c, _ in ctx.capture_state]) if ctx.capture_state else None  # [lin, n, C, K-1]
        states = torch.stack([s for _, s in ctx.capture_state]) if ctx.capture_state else None  # [lin, n, Hv, Dk, Dv]
        out, off = [], 0
        for j, h in enumerate(heads):
            out.append(PrefixKV(ks[:, off : off + len(h)].clone(), vs[:, off : off + len(h)].clone(),
                                None if convs is None else convs[:, j].clone(),
                                None if states is None else states[:, j].clone()))
            off += len(h)
        return out

    # -- encoder-decoder pairs (KaLM-Reranker) --------------------------------------------------
    def passages(self, step: PassageStep):
        """Encode the step's missing passages into the pool, then decode its prompts against their
        cached passages: (logits [n], scores [n], encode s, forward s), or None with nothing to score."""
        t0 = time.perf_counter()
        if step.encode:
            todo = [(step.entries[k], ids, r) for k, ids, r in step.encode]
            passages.encode_passages(self.model, self.passage_cache, todo, self.device, cache_kv=self.cache_kv)
        t1 = time.perf_counter()
        if not step.items:
            return None
        seqs = [s for _, s in step.items]
        ids, ctx = self.model.plan(seqs, self.device, passages=[step.entries[k] for k in step.keys],
                                   passage_cache=self.passage_cache, cache_kv=self.cache_kv)
        hidden, residual = self.forward(ids, ctx)
        logit, score = self.head(hidden, residual, ctx, self.model)
        return logit.float().cpu().numpy(), score.float().cpu().numpy(), t1 - t0, time.perf_counter() - t1

    # -- generation ----------------------------------------------------------------------------
    def lm_head(self) -> torch.Tensor:
        if self._lm_head is None:
            self._lm_head = decode.load_lm_head(self.model, self.folder)
        return self._lm_head

    def prefill(self, step: PrefillStep) -> List[int]:
        """Prefill the step's prompts and add their rows to the running decode cache; first tokens."""
        self._keep(step.keep)
        first, cache = decode.prefill(self.model, self.lm_head(), step.seqs, step.prefix, step.capacity, self.device)
        self.decode_cache = cache if self.decode_cache is None else self.decode_cache.extend(cache)
        return first.tolist()

    def decode(self, step: DecodeStep) -> List[int]:
        """One token for every running row: next tokens, in row order."""
        self._keep(step.keep)
        if not step.tokens:
            return []
        tokens = torch.tensor(step.tokens, dtype=torch.int64, device=self.device)
        return decode.decode_step(self.model, self.lm_head(), self.decode_cache, tokens).tolist()

    def _keep(self, keep: Optional[List[int]]) -> None:
        if keep is None or self.decode_cache is None:
            return
        if not keep:
            self.decode_cache = None
        else:
            self.decode_cache.keep(torch.tensor(keep, dtype=torch.int64, device=self.device))

    def drop_decode(self) -> None:
        self.decode_cache = None
