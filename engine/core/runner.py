"""The model runner: owns the device, the weights and the head; runs one step.

Only the engine thread calls it. Each step's kind (engine/core/steps/) runs it
here: plan (the model builds its batch context from typed sequences), forward,
head. It never creates or calls the scheduler: steps come in, tensors and
numbers go back.
"""
import logging
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Optional

import torch

import kernels
from engine.core.cache import PassageCache
from engine.models import memory, registry
from engine.models.cpu_linear import calibrate, check_bf16, onednn_available, pack_linears, quantize_linears
from engine.models.heads import HEAD_BUILDERS
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
                 quantize: Optional[str] = None, calibration=None):
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
        if device.type == "cpu":  # before the first GEMM, on every CPU path (int8, ENGINE_KERNELS=torch too)
            memory.tune()
        if quantize is not None:  # after loading: the int8 weights are made from the loaded fp32 ones
            if device.type != "cpu" or dtype != torch.float32 or compile:
                raise ValueError("quantize='int8' is a CPU mode: device cpu, dtype float32, compile off")
            # SmoothQuant's statistics: one fp32 forward of the calibration set (``calibration()``: Seqs in
            # the model's prompt). Encoder-decoders score through passages: they quantize without it.
            act_max = None
            if calibration is not None and not self.model.is_encoder_decoder:
                act_max = calibrate(self.model, calibration(), device)
            quantize_linears(self.model, quantize, act_max)
        elif self.packs_linears(device, dtype, compile):
            pack_linears(self.model)
        if device.type == "cpu" and dtype == torch.bfloat16:
            check_bf16()  # a CPU without bf16 instructions is told so
        # The last layer may run for the last rows alone when the head reads nothing else.
        self.last_only = self.head.reads_last_token and self.model.supports_last_only
        self.passage_cache: Optional[PassageCache] = None  # set by the engine for encoder-decoders
        self.cache_kv = False
        if device.type == "cuda":  # compile every Triton variant the batches will launch now, not in a request
            from kernels.warmup import warm_up
            warm_up(spec.module, config_dict, dtype, device)

    @staticmethod
    def packs_linears(device: torch.device, dtype: torch.dtype, compile: bool) -> bool:
        """Whether the linears run oneDNN with packed weights (engine/models/cpu_linear.py): on CPU in fp32 or
        bf16 unless ``ENGINE_KERNELS=torch`` (the references) or compiled (inductor does its own)."""
        return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and not compile
                and kernels.kernel_mode() != "torch" and onednn_available())

    def run(self, step):
        """Execute one step: its kind runs it on this runner's model, head and device."""
        with torch.inference_mode():
            return step.kind.run(self, step)
