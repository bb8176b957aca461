"""int8 linear layer with per-row (per-token) activation quantization: ``act(x W^T + b)``.

Weights are int8 per output channel, symmetric (``W ~ w_scale[n] * Wq[n, :]``), prepared once at
load; an optional SmoothQuant factor ``s`` (per input channel) is folded into them beforehand,
and ``inv_smooth = 1 / s`` scales x back here. Activations are quantized per row, asymmetric, with
a range that always holds 0: ``x ~ scale[t] * (q[t, :] - zero[t])``, q and zero in [-128, 127].
The GEMM is exact in int32 (``torch._int_mm``, VNNI on x86), and

    y[t, n] = (acc[t, n] - zero[t] * w_sum[n]) * scale[t] * w_scale[n] + bias[n],
    acc = q @ Wq^T,  w_sum[n] = sum_k Wq[n, k]

so each row's result depends on that row alone: batch-invariant, bitwise. ``activation``: 0
none, 1 GELU (erf), 2 GELU (tanh), applied to y. x fp32 ``[T, K]``, y fp32 ``[T, N]``.

CPU only (quantize="int8" is a CPU mode): the C++ kernels (csrc/) quantize the rows in one pass
and dequantize (+ bias + activation) in one pass around the GEMM; the reference below runs the same
arithmetic in torch ops. The GEMM is oneDNN's u8s8 matmul on a weight packed once
(``pack_int8_weight``, ``int8_linear_packed``: AMX or VNNI, 2-3x ``torch._int_mm``'s rate at hundreds of
rows on AMX CPUs), else ``torch._int_mm``. oneDNN takes the codes as uint8 ``q + 128`` (zero point
``zero + 128``) and writes the exact int32 sums as fp32; either way every step is per row or exact.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import _csrc
from ._dispatch import kernel_mode
from ._library import engine_op

ACTIVATIONS = {None: 0, "gelu": 1, "gelu_tanh": 2}


def quantize_rows_ref(x: torch.Tensor, inv_smooth: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """(q int8 [T, K], scale fp32 [T], zero int32 [T]) of x fp32 [T, K] (times inv_smooth [K])."""
    if inv_smooth is not None:
        x = x * inv_smooth
    lo = x.amin(1).clamp_max(0.0)
    hi = x.amax(1).clamp_min(0.0)
    scale = ((hi - lo) / 255.0).clamp_min(1e-12)
    zero = torch.round(-lo / scale) - 128.0  # in [-128, 127]: the range holds 0
    q = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], -128.0, 127.0).to(torch.int8)
    return q, scale, zero.to(torch.int32)


def dequantize_rows_ref(acc: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, w_sum: torch.Tensor,
                        w_scale: torch.Tensor, bias: Optional[torch.Tensor], activation: int) -> torch.Tensor:
    """y fp32 [T, N] from the int32 GEMM ``acc`` [T, N] (see the module docstring)."""
    y = (acc - zero[:, None] * w_sum[None, :]).float() * scale[:, None] * w_scale[None, :]
    if bias is not None:
        y = y + bias
    if activation == 1:
        y = F.gelu(y)
    elif activation == 2:
        y = F.gelu(y, approximate="tanh")
    return y


def int8_mm(q: torch.Tensor, wq_t: torch.Tensor) -> torch.Tensor:
    """q int8 [T, K] @ wq_t int8 [K, N] -> int32 [T, N], exact."""
    return torch._int_mm(q, wq_t)


def int8_linear_ref(
    x: torch.Tensor,  # [T, K] fp32
    wq_t: torch.Tensor,  # [K, N] int8 (Wq transposed)
    w_scale: torch.Tensor,  # [N] fp32
    w_sum: torch.Tensor,  # [N] int32
    bias: Optional[torch.Tensor],  # [N] fp32
    inv_smooth: Optional[torch.Tensor],  # [K] fp32
    activation: int,
) -> torch.Tensor:
    q, scale, zero = quantize_rows_ref(x, inv_smooth)
    return dequantize_rows_ref(int8_mm(q, wq_t), scale, zero, w_sum, w_scale, bias, activation)


def _cpu(ext, x, wq_t, w_scale, w_sum, bias, inv_smooth, activation):
    q, scale, zero = ext.quantize_rows(x, inv_smooth)
    return ext.dequantize_rows(int8_mm(q, wq_t), scale, zero, w_sum, w_scale, bias, activation)


int8_linear_op = engine_op(
    "int8_linear", int8_linear_ref, int8_linear_ref,
    lambda x, wq_t, w_scale, w_sum, bias, inv_smooth, activation: x.new_empty((x.shape[0], wq_t.shape[1])),
    cpu=_cpu)


def prepare_int8_weight(weight: torch.Tensor, smooth: Optional[torch.Tensor] = None):
    """(wq_t int8 [K, N] (a transposed view), w_scale fp32 [N], w_sum int32 [N]) of a fp32 weight [N, K], with the
    SmoothQuant factor ``smooth`` [K] folded in (the layer then passes ``1 / smooth``)."""
    w = weight.detach().float()
    if smooth is not None:
        w = w * smooth[None, :]
    w_scale = (w.abs().amax(1) / 127.0).clamp_min(1e-12)
    wq = torch.clamp(torch.round(w / w_scale[:, None]), -127, 127).to(torch.int8)
    # Wq^T as the transpose of the row-major [N, K] codes: the layout _int_mm is fastest with at few rows.
    return wq.contiguous().t(), w_scale.contiguous(), wq.to(torch.int32).sum(1).contiguous()


def int8_linear(x, wq_t, w_scale, w_sum, bias=None, inv_smooth=None, activation: Optional[str] = None):
    """``act(x W^T + b)`` with W prepared by ``prepare_int8_weight`` (``torch.ops.engine.int8_linear``)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(a for a in ACTIVATIONS if a)} or None, got {activation!r}")
    return int8_linear_op(x.contiguous(), wq_t, w_scale, w_sum, bias, inv_smooth, ACTIVATIONS[activation])


def onednn_int8_available() -> bool:
    """Whether ``int8_linear_packed`` runs here: an x86 CPU with AVX2 or AVX-512, the C++ kernels loaded, not
    ``ENGINE_KERNELS=torch``, and a torch with oneDNN's quantized linear."""
    return (kernel_mode() != "torch" and torch.backends.mkldnn.is_available()
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
            and hasattr(torch.ops.onednn, "qlinear_pointwise") and _csrc.module() is not None)


def pack_int8_weight(wq_t: torch.Tensor) -> torch.Tensor:
    """``prepare_int8_weight``'s codes reordered once into oneDNN's blocked layout (a ``torch._mkldnn``
    tensor) for ``int8_linear_packed``."""
    return torch.ops.onednn.qlinear_prepack(wq_t.t().contiguous(), None)


_UNIT = {}  # N -> (ones fp32 [N], zeros int64 [N]): oneDNN's weight scales and zero points, left to the epilogue


def int8_linear_packed(x, packed, w_scale, w_sum, bias=None, inv_smooth=None, activation: Optional[str] = None,
                       rows: Optional[int] = None, out_dtype: torch.dtype = torch.float32):
    """``int8_linear`` through oneDNN's u8s8 GEMM on ``pack_int8_weight``'s weight (see the module
    docstring); the same arithmetic as the reference, the int32 sums exact below 2^24. ``rows`` (>= x's
    row count): the GEMM runs at that many rows, the codes padded with zeros, so that oneDNN builds one
    primitive per bucket of row counts, not one per row count (a few ms each); the sums are exact, so
    the padding changes no bit of the real rows. ``out_dtype`` bfloat16: y rounded to bf16 in the
    dequantization's pass (the bits of ``y.to(torch.bfloat16)``), for a bf16 GEMM that reads it."""
    ext = _csrc.module()
    n = w_scale.shape[0]
    unit = _UNIT.get(n)
    if unit is None:
        unit = _UNIT[n] = (torch.ones(n), torch.zeros(n, dtype=torch.long))
    u, scale, zero = ext.quantize_rows(x.contiguous(), inv_smooth, True)
    t = u.shape[0]
    if rows is not None and rows > t:
        padded = u.new_zeros(rows, u.shape[1])
        padded[:t] = u
        u = padded
    acc = torch.ops.onednn.qlinear_pointwise(u, 1.0, 0, packed, unit[0], unit[1], None, 1.0, 0, torch.float32,
                                             "none", [], "")
    return ext.dequantize_rows(acc[:t], scale, zero, w_sum, w_scale, bias, ACTIVATIONS[activation],
                               out_dtype == torch.bfloat16)
