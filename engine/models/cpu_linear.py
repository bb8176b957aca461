"""CPU linear layers, swapped in after loading (gpt-fast's way: modules are swapped, ``forward``
never branches).

By default on CPU (fp32 and bf16), every linear layer runs oneDNN with its weight reordered once
into oneDNN's blocked layout (``PackedLinear``): 1.2-1.6x the GFLOP/s of ``F.linear`` (MKL, which
reorders nothing and on AMD CPUs does not take its AVX-512 path) on this machine, more at few rows,
and an activation after the linear (BERT's GELU) is fused into the GEMM's epilogue.

Opt-in quantization: ``quantize="int8"`` swaps every linear layer of a loaded model for an int8
one (``Int8Linear``, kernels/int8_linear.py):
  - weights int8 per output channel (symmetric), prepared once here;
  - activations quantized per row (per token), asymmetric, so a sequence's result never depends on
    the other sequences of its batch (bitwise: the int32 GEMM is exact and every other step is per
    row);
  - SmoothQuant: where calibration statistics are given (``calibrate``: the per-input-channel
    maxima of each layer's input over a fixed calibration set), the activation outliers are moved
    into the weights, ``x W^T = (x / s)(W s)^T`` with ``s = max|x|^a / max|W|^(1-a)`` per input
    channel, a = SMOOTH_ALPHA (chosen by measurement: bench/RESULTS.md);
  - BERT's GELU is fused into the dequantization, as PackedLinear fuses it into the fp32 GEMM.
Embeddings, norms, attention and heads stay fp32.
"""
import logging
from typing import Dict, Optional

import torch
from torch import nn

import kernels
from engine.models import memory
from engine.models.layers import Linear

log = logging.getLogger("engine")

QUANTIZE_MODES = ("int8",)
SMOOTH_ALPHA = 0.5  # the migration strength of SmoothQuant (bench/RESULTS.md: 0.3, 0.5, 0.7 measured)
# Activations the int8 dequantization fuses (kernels/int8_linear.py's names).
INT8_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# Activations oneDNN fuses into the GEMM: name -> (attr, algorithm) of mkldnn._linear_pointwise.
FUSABLE_ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
                       "relu": ("relu", "")}


def bucket_rows(n: int) -> int:
    """The row count a packed GEMM runs at for ``n`` rows: ``n`` up to 16, else ``n`` rounded up to a
    multiple of an eighth of its power of two (at most 12.5% of padding). oneDNN builds and caches one
    primitive per shape, a few MB each; real traffic brings hundreds of row counts, so memory would
    grow with every new one. Bucketed, 1 to 10,000 rows need 90 shapes, a million 144. Each row's result does
    not depend on the row count (no split over K), so padding changes no result bit."""
    if n <= 16:
        return n
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """``act(x W^T + b)`` through oneDNN with W reordered once (``torch._mkldnn`` layout); x, W
    fp32 or bf16 on CPU. ``activation``: a key of ``FUSABLE_ACTIVATIONS`` or None."""

    def __init__(self, linear: Linear, activation: Optional[str] = None):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self._weight = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)
        self._bias = None if linear.bias is None else linear.bias.detach().contiguous()
        self.activation = activation
        self._attr, self._algorithm = FUSABLE_ACTIVATIONS[activation] if activation else ("none", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        n = rows.shape[0]
        m = bucket_rows(n)
        if m != n:  # padded to its bucket (see bucket_rows); the padding rows are zeros, dropped after
            padded = rows.new_empty(m, shape[-1])
            padded[:n] = rows
            padded[n:] = 0
            rows = padded
        y = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), self._weight, self._bias,
                                               self._attr, [], self._algorithm)
        return (y[:n] if m != n else y).view(*shape[:-1], self.out_features)


def _linears(model: nn.Module):
    """Every ``Linear`` that may be swapped: not those marked ``swappable = False`` (a model that
    reads a layer's ``weight`` itself, as T5Gemma2's cross K/V projection does)."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, Linear) and getattr(child, "swappable", True)]


def pack_linears(model: nn.Module) -> int:
    """Swap every ``Linear`` of a loaded CPU model for a ``PackedLinear``; a module that declares
    ``fusable_activation`` (a ``FUSABLE_ACTIVATIONS`` key) and has a ``dense`` linear gets its
    activation fused and its own ``act`` set to the identity. A model that ``pads_rows`` gets ``row_bucket``
    set: it pads its token rows once per batch, so every linear runs at a bucket without copying its input.
    Returns how many were swapped."""
    memory.tune()  # before the first GEMM: allocator settings and oneDNN's primitive cache cap
    swaps = _linears(model)
    for parent, name, child in swaps:
        act = getattr(parent, "fusable_activation", None) if name == "dense" else None
        if act not in FUSABLE_ACTIVATIONS:
            act = None
        setattr(parent, name, PackedLinear(child, act))
        if act is not None:
            parent.act = nn.Identity()
    if swaps and getattr(model, "pads_rows", False):
        model.row_bucket = bucket_rows  # rows padded once per batch: no linear copies its input
    return len(swaps)


def has_vnni() -> bool:
    """Whether this CPU has the int8 dot-product instructions (AVX512-VNNI or AVX-VNNI)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def smooth_factors(weight: torch.Tensor, act_max: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``s = max|x|^a / max|W|^(1-a)`` ([K], fp32)."""
    w_max = weight.detach().float().abs().amax(0).clamp_min(1e-5)
    return (act_max.float().clamp_min(1e-5) ** alpha / w_max ** (1 - alpha)).clamp(1e-4, 1e4)


class Int8Linear(nn.Module):
    """``act(x W^T + b)``: W int8 per output channel (SmoothQuant factor folded in), x quantized per
    row (kernels/int8_linear.py); x fp32. Weights are prepared once, here."""

    def __init__(self, linear: Linear, activation: Optional[str] = None, act_max: Optional[torch.Tensor] = None,
                 alpha: float = SMOOTH_ALPHA):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        smooth = smooth_factors(w, act_max, alpha) if act_max is not None else None
        self._wq_t, self._w_scale, self._w_sum = kernels.prepare_int8_weight(w, smooth)
        self._inv_smooth = None if smooth is None else (1.0 / smooth).contiguous()
        self._bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.activation = activation  # a kernels.int8_linear activation ("gelu", "gelu_tanh") or None
        self.smoothed = smooth is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = kernels.int8_linear(x.reshape(-1, shape[-1]), self._wq_t, self._w_scale, self._w_sum, self._bias,
                                self._inv_smooth, self.activation)
        return y.view(*shape[:-1], self.out_features)


@torch.inference_mode()
def calibrate(model: nn.Module, seqs, device) -> Dict[nn.Module, torch.Tensor]:
    """The per-input-channel maximum of |x| of every swappable linear layer over one forward of
    ``seqs`` (the model still in fp32, before any swap)."""
    stats: Dict[nn.Module, torch.Tensor] = {}
    hooks = []
    for _, _, child in _linears(model):
        def hook(mod, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            stats[mod] = torch.maximum(stats[mod], x) if mod in stats else x
        hooks.append(child.register_forward_hook(hook))
    try:
        ids, ctx = model.plan(list(seqs), device)
        model(ids, ctx)
    finally:
        for h in hooks:
            h.remove()
    return stats


def quantize_linears(model: nn.Module, mode: str, act_max: Optional[Dict[nn.Module, torch.Tensor]] = None) -> int:
    """Swap every ``Linear`` (fused ones included) of a loaded fp32 CPU model for an ``Int8Linear``;
    ``act_max`` (``calibrate``'s statistics) turns SmoothQuant on. A ``dense`` layer of a module that
    declares a fusable activation gets it fused. Returns how many were swapped."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if not has_vnni():
        log.warning("this CPU has no VNNI (avx512_vnni or avx_vnni): quantize='int8' runs its int8 GEMMs "
                    "without the int8 dot-product instructions and may be slower than float32")
    swaps = _linears(model)
    for parent, name, child in swaps:
        if child.weight.device.type != "cpu" or child.weight.dtype != torch.float32:
            raise ValueError("quantize='int8' runs on CPU with dtype float32 weights")
        act = INT8_ACTIVATIONS.get(getattr(parent, "fusable_activation", None)) if name == "dense" else None
        setattr(parent, name, Int8Linear(child, act, None if act_max is None else act_max.get(child)))
        if act is not None:
            parent.act = nn.Identity()
    return len(swaps)
