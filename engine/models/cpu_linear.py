"""CPU linear layers, swapped in after loading (gpt-fast's way: modules are swapped, ``forward``
never branches).

By default on CPU (fp32 and bf16), every linear layer runs oneDNN with its weight reordered once
into oneDNN's blocked layout (``PackedLinear``): 1.2-1.6x the GFLOP/s of ``F.linear`` (MKL, which
reorders nothing and on AMD CPUs does not take its AVX-512 path) on this machine, more at few rows,
and an activation after the linear (BERT's GELU) is fused into the GEMM's epilogue.

Opt-in quantization: ``quantize="int8"`` swaps every linear layer of a loaded model for a
dynamic int8 one.

Weights are int8 per output channel (symmetric); activations are quantized per call, per tensor,
and the int8 GEMM (torch's x86/fbgemm backend, VNNI where the CPU has it) accumulates in int32 and
returns fp32 with the bias added. Embeddings, norms, attention and heads stay fp32. The drift
from fp32 is measured, not assumed: bench/RESULTS.md.
"""
import warnings
from typing import Optional

import torch
from torch import nn

from engine.models.layers import Linear

QUANTIZE_MODES = ("int8",)
# Activations oneDNN fuses into the GEMM: name -> (attr, algorithm) of mkldnn._linear_pointwise.
FUSABLE_ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
                       "relu": ("relu", "")}


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
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]).contiguous(), self._weight, self._bias,
                                               self._attr, [], self._algorithm)
        return y.view(*shape[:-1], self.out_features)


def _linears(model: nn.Module):
    """Every ``Linear`` that may be swapped: not those marked ``swappable = False`` (a model that
    reads a layer's ``weight`` itself, as T5Gemma2's cross K/V projection does)."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, Linear) and getattr(child, "swappable", True)]


def pack_linears(model: nn.Module) -> int:
    """Swap every ``Linear`` of a loaded CPU model for a ``PackedLinear``; a module that declares
    ``fusable_activation`` (a ``FUSABLE_ACTIVATIONS`` key) and has a ``dense`` linear gets its
    activation fused and its own ``act`` set to the identity. Returns how many were swapped."""
    swaps = _linears(model)
    for parent, name, child in swaps:
        act = getattr(parent, "fusable_activation", None) if name == "dense" else None
        if act not in FUSABLE_ACTIVATIONS:
            act = None
        setattr(parent, name, PackedLinear(child, act))
        if act is not None:
            parent.act = nn.Identity()
    return len(swaps)


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with W int8 per output channel and x quantized dynamically; x fp32."""

    def __init__(self, linear: Linear):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # torch marks quantized tensors for removal; this is their only use
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(qw, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # reduce_range=False: 8-bit activations (VNNI's int32 accumulation does not saturate)
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).contiguous(), self._packed, False)
        return y.view(*shape[:-1], self.out_features)


def quantize_linears(model: nn.Module, mode: str) -> int:
    """Swap every ``Linear`` (fused ones included) of a loaded fp32 CPU model; returns how many."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    swaps = _linears(model)
    for parent, name, child in swaps:
        if child.weight.device.type != "cpu" or child.weight.dtype != torch.float32:
            raise ValueError("quantize='int8' runs on CPU with dtype float32 weights")
        setattr(parent, name, Int8Linear(child))
    return len(swaps)
