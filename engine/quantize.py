"""Opt-in CPU quantization: ``quantize="int8"`` swaps every linear layer of a loaded model for a
dynamic int8 one (gpt-fast's way: modules are swapped, ``forward`` never branches).

Weights are int8 per output channel (symmetric); activations are quantized per call, per tensor,
and the int8 GEMM (torch's x86/fbgemm backend, VNNI where the CPU has it) accumulates in int32 and
returns fp32 with the bias added. Embeddings, norms, attention and heads stay fp32. The drift
from fp32 is measured, not assumed: bench/RESULTS.md.
"""
import warnings

import torch
from torch import nn

from engine.layers import Linear

QUANTIZE_MODES = ("int8",)


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
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, Linear)]
    for parent, name, child in swaps:
        if child.weight.device.type != "cpu" or child.weight.dtype != torch.float32:
            raise ValueError("quantize='int8' runs on CPU with dtype float32 weights")
        setattr(parent, name, Int8Linear(child))
    return len(swaps)
