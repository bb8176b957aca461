"""Triton kernels of the engine, each beside its pure-torch reference.

The engine calls only the names below. CUDA tensors run the Triton kernel and
CPU tensors the C++ kernel (csrc/, when built) or the reference;
``ENGINE_KERNELS=triton|torch`` forces one path.
"""
from ._dispatch import kernel_mode, use_triton
from ._csrc import available as csrc_available
from .attention import varlen_attention
from .causal_conv1d import causal_conv1d
from .gated_delta_rule import chunk_plan, gated_delta_rule
from .host import bind_device, to_device
from .int8_linear import (int8_linear, int8_linear_packed, onednn_int8_available, pack_int8_weight,
                          prepare_int8_weight)
from .layer_norm import layer_norm
from .paged_attention import paged_attention
from .pooling import mean_pool
from .qk_norm_rope import qk_norm_rope, rope_cos_sin
from .rms_norm import rms_norm
from .swiglu import swiglu
from .yes_no_head import yes_no_head

__all__ = [
    "kernel_mode", "use_triton", "varlen_attention", "qk_norm_rope", "rope_cos_sin",
    "rms_norm", "swiglu", "yes_no_head", "paged_attention",
    "causal_conv1d", "gated_delta_rule", "chunk_plan", "layer_norm", "mean_pool", "csrc_available",
    "int8_linear", "int8_linear_packed", "onednn_int8_available", "pack_int8_weight", "prepare_int8_weight",
    "to_device", "bind_device",
]
