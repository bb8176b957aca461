"""The model runner: owns the device, the weights and the heads; runs packed batches."""
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional, Sequence

import torch

from engine import registry
from engine.context import build_context
from engine.heads import HEAD_BUILDERS
from engine.templates import Encodings
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


class Cancelled(RuntimeError):
    """The caller cancelled the request (e.g. its HTTP client went away)."""


class ModelRunner:
    def __init__(self, model, task: Optional[str] = None, task_default: Optional[str] = None,
                 device=None, dtype=None, max_length: int = 8192, max_batch_tokens: Optional[int] = None):
        self.folder: Path = resolve_model(model)
        self.config_dict = read_config(self.folder)
        self.arch, spec = registry.lookup(self.config_dict)
        self.task = registry.infer_task(spec, f"{model} {self.folder.name}", task, task_default)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.config = SimpleNamespace(**self.config_dict)
        self.tokenizer = load_tokenizer(self.folder)
        self.max_length = max_length
        self.template = registry.template_class(spec, self.task)(self.tokenizer, max_length=max_length)
        self.max_batch_tokens = max_batch_tokens or (16384 if self.device.type == "cuda" else 8192)

        index = checkpoint_index(self.folder)
        # Our layers allocate with torch.empty (no init work); the loader fills every parameter.
        model_cls = registry.model_class(spec)
        with self.device, _default_dtype(self.dtype):
            self.model = model_cls(self.config)
        self.model.eval()
        lm_head = {"lm_head.weight"}
        self.loaded = load_weights(self.model, index, reserved=lm_head,
                                   ignore=lambda n: n.endswith("rotary_emb.inv_freq"))
        self.head = HEAD_BUILDERS[spec.tasks[self.task].head](self.config_dict, self.tokenizer, index).to(self.device)
        log.info("loaded %s (%s, task %s) on %s in %s", self.folder, self.arch, self.task, self.device, self.dtype)

    @torch.inference_mode()
    def run(self, enc: Encodings, stats: Optional[dict] = None, cancel=None) -> torch.Tensor:
        """Run the head over every sequence; outputs in input order ([n] or [n, H], fp32, CPU)."""
        seqs, types = enc.ids, enc.token_types
        n = len(seqs)
        for i, s in enumerate(seqs):
            if len(s) == 0:
                raise ValueError(f"input {i} is empty after tokenization")
        if n == 0:
            return torch.empty(0)
        # Longest first, packed greedily under the token budget: no padding anywhere.
        order = sorted(range(n), key=lambda i: -len(seqs[i]))
        outs: List[Optional[torch.Tensor]] = [None] * n
        batch: List[int] = []
        tokens = 0
        t0 = time.perf_counter()
        batches = 0
        for i in order + [None]:
            if i is not None and (not batch or tokens + len(seqs[i]) <= self.max_batch_tokens):
                batch.append(i)
                tokens += len(seqs[i])
                continue
            if cancel is not None and cancel.is_set():
                raise Cancelled("request cancelled")
            ids, ctx = build_context([seqs[j] for j in batch], self.device,
                                     None if types is None else [types[j] for j in batch])
            hidden, residual = self.model(ids, ctx)
            res = self.head(hidden, residual, ctx, self.model).float().cpu()
            for k, j in enumerate(batch):
                outs[j] = res[k]
            batches += 1
            if i is not None:
                batch, tokens = [i], len(seqs[i])
        if stats is not None:
            stats["batches"] = stats.get("batches", 0) + batches
            stats["tokens"] = stats.get("tokens", 0) + sum(len(s) for s in seqs)
            stats["forward_s"] = stats.get("forward_s", 0.0) + time.perf_counter() - t0
        return torch.stack(outs)
