"""The model runner: owns the device, the weights and the heads; runs packed batches."""
import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

import torch

from engine import registry
from engine.cache import PrefixCache, PrefixKV
from engine.context import build_context
from engine.scheduler import Cancelled, Request, Scheduler  # noqa: F401 (Cancelled is re-exported)
from engine.heads import HEAD_BUILDERS
from engine.tokenizer import load_tokenizer
from engine.weights import checkpoint_index, load_weights, read_config, resolve_model

log = logging.getLogger("engine")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


class ModelRunner:
    def __init__(self, model, task: Optional[str] = None, task_default: Optional[str] = None,
                 device=None, dtype=None, max_length: int = 8192, max_batch_tokens: Optional[int] = None,
                 prefix_cache_bytes: int = 256 << 20, template: Optional[str] = None):
        self.folder: Path = resolve_model(model)
        self.config_dict = read_config(self.folder)
        self.arch, spec = registry.lookup(self.config_dict)
        self.task = registry.infer_task(spec, f"{model} {self.folder.name}", task, task_default)
        self.device = pick_device(device)
        if self.device.type == "cpu":
            # On CPU the model wants every core; the tokenizer's own thread pool would spin against it.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.dtype = pick_dtype(dtype, self.device)
        self.config = SimpleNamespace(**self.config_dict)
        self.tokenizer = load_tokenizer(self.folder)
        self.max_length = max_length
        template_cls = registry.template_class(spec, self.task, template, f"{model} {self.folder.name}")
        # Encoder templates read sentence-transformers files and the position limit.
        files = {"folder": self.folder, "config": self.config_dict} if getattr(template_cls, "needs_model_files", False) else {}
        self.template = template_cls(self.tokenizer, max_length=max_length, **files)
        # CPU: 4096 measured best of 1k-32k on bench/e2e_rerank.py (2 cores); GPU: 16k, not yet measured.
        self.max_batch_tokens = max_batch_tokens or (16384 if self.device.type == "cuda" else 4096)

        index = checkpoint_index(self.folder)
        # Our layers allocate with torch.empty (no init work); the loader fills every parameter.
        model_cls = registry.model_class(spec)
        with self.device, _default_dtype(self.dtype):
            self.model = model_cls(self.config)
        self.model.eval()
        self.head = HEAD_BUILDERS[spec.tasks[self.task].head](self.config_dict, self.tokenizer, index).to(self.device)
        # Tensors a head reads (or knows to be unused) are not the model's; all others must load.
        reserved = {"lm_head.weight"} | set(getattr(self.head, "checkpoint_names", ()))
        skip = set(getattr(model_cls, "ignored_checkpoint_names", ()))
        skip_prefixes = tuple(getattr(model_cls, "ignored_checkpoint_prefixes", ()))  # e.g. a vision tower
        self.loaded = load_weights(self.model, index, reserved=reserved,
                                   strip_prefixes=getattr(model_cls, "checkpoint_prefixes", ("model.",)),
                                   ignore=lambda n: n.endswith("rotary_emb.inv_freq") or n in skip
                                   or (bool(skip_prefixes) and n.startswith(skip_prefixes)))
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self._scheduler: Optional[Scheduler] = None
        self._lock = threading.Lock()
        log.info("loaded %s (%s, task %s) on %s in %s", self.folder, self.arch, self.task, self.device, self.dtype)

    @torch.inference_mode()
    def run_batch(self, seqs, token_types=None, prefixes=None, prefix_index=None):
        """One packed forward + head. Returns (fp32 numpy [n, ...], forward seconds, head seconds)."""
        t0 = time.perf_counter()
        ids, ctx = build_context(seqs, self.device, token_types, prefixes, prefix_index)
        if getattr(self.head, "reads_last_token", False) and getattr(self.model, "supports_last_only", False):
            ctx.last_only = True
            ctx.cu_last = torch.arange(len(seqs) + 1, dtype=torch.int32, device=self.device)
        hidden, residual = self.model(ids, ctx)
        if ctx.last_only:  # the model returned the last rows only
            ctx.last_index = torch.arange(len(seqs), device=self.device)
        t1 = time.perf_counter()
        out = self.head(hidden, residual, ctx, self.model).float().cpu().numpy()  # .cpu() syncs the device
        return out, t1 - t0, time.perf_counter() - t1

    @torch.inference_mode()
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

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            with self._lock:
                if self._scheduler is None:
                    self._scheduler = Scheduler(self, self.max_batch_tokens)
        return self._scheduler

    def submit(self, n: int, encode, head=None, priority: int = 0, cancel=None) -> Request:
        """Queue n sequences (``encode(start, end) -> Encodings``) on the engine thread."""
        return self.scheduler.submit(Request(n, encode, head=head, priority=priority, cancel=cancel))


_STATS_LOCK = threading.Lock()


def merge_stats(into: Optional[dict], stats: dict) -> None:
    """Add counters into a dict that request threads share (a Reranker's cumulative ``stats``)."""
    if into is None:
        return
    with _STATS_LOCK:
        for k, v in stats.items():
            into[k] = into.get(k, 0) + v
