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
  - BERT's GELU is fused into the dequantization, as PackedLinear fuses it into the fp32 GEMM;
  - the FFN's down-projections stay in float (PackedLinear): measured, they carry most of int8's error
    (their input is the activation's heavy-tailed output), see FFN_DOWN_NAMES; bf16 GEMMs in fixed-row
    calls (still bitwise batch-invariant, see FIXED_ROWS) where the CPU has bf16 instructions, else fp32;
    their input then comes as bf16 from the up-projection's dequantization (a module that ``feeds_ffn_down``);
  - BERT-family models (``pads_rows``) pad their token rows once per batch to a row bucket, so the int8
    GEMMs run at bucket_rows' counts without padding their codes.
Embeddings, norms, attention and heads stay fp32.
"""
import logging
import os
from typing import Dict, Optional

import torch
from torch import nn

import kernels
from engine.models import memory
from engine.models.layers import Linear

log = logging.getLogger("engine")

QUANTIZE_MODES = ("int8",)
# Linears int8 keeps in float (oneDNN, packed; bf16 where the CPU has bf16 instructions, BF16_FFN_DOWN): the
# FFN's down-projections. Measured on MiniLM over 1,000 texts
# (bench/RESULTS.md): each layer kind's int8 error alone, the down-projections' input (the activation's
# heavy-tailed output) and weights cost the most; with them in float the min cosine to fp32 goes from
# 0.9986 to 0.9994, any other kind kept in float gains at most 0.0003. A family marks them
# ``ffn_down = True`` or names them ``down_proj``.
FFN_DOWN_NAMES = ("down_proj",)
# int8's kept down-projections in bf16 where the CPU has bf16 instructions: min cosine 0.99933 to fp32 against
# fp32 downs' 0.99940, 1.6x int8's throughput (bench/RESULTS.md)
BF16_FFN_DOWN = True
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
    not depend on the row count (no split over K; not so for bf16 on AMX: FIXED_ROWS), so padding changes no
    result bit; except at one row, where oneDNN takes another kernel (at K >= 1536 in fp32 its row differs
    from the same row in any larger call, e.g. a decode step of one sequence against several): one row runs
    at two."""
    if n <= 16:
        return 2 if n == 1 else n
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


# bf16 on AMX: oneDNN's AMX bf16 matmul picks its blocking over K by the call's row count, so at some row
# counts (K = 512 to 4096: from 33-64 rows up to 300-2,048+, by shape) a few rows come out one bf16 ulp away
# from the same row in a call of another size. At one fixed row count per call the blocking is fixed and a
# row's bits depend on nothing else in its call (measured: any offset in the block, any other rows). So
# int8's bf16 down-projections always run in calls of FIXED_ROWS rows, the last one zero-padded, and a bf16
# model does on AMX CPUs where ENGINE_BATCH_INVARIANT=1 (off by default: it costs 12-20% of bf16's
# throughput and up to 1.9x one short text's latency, bench/RESULTS.md).
FIXED_ROWS = 256


def batch_invariant_bf16() -> bool:
    """Whether a bf16 model's linears run in fixed-row calls: on CPUs with AMX, where ENGINE_BATCH_INVARIANT=1
    (elsewhere bf16 is bitwise batch-invariant at every row count)."""
    return os.environ.get("ENGINE_BATCH_INVARIANT", "0") == "1" and has_amx()


def fixed_rows(n: int) -> int:
    """The row count a fixed-block packed GEMM runs ``n`` rows at: ``n`` rounded up to FIXED_ROWS."""
    return -(-max(n, 1) // FIXED_ROWS) * FIXED_ROWS


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """``act(x W^T + b)`` through oneDNN with W reordered once (``torch._mkldnn`` layout); x, W
    fp32 or bf16 on CPU. ``activation``: a key of ``FUSABLE_ACTIVATIONS`` or None. ``block``: run in calls
    of exactly this many rows (the last padded), for bitwise batch invariance (see FIXED_ROWS); None: one
    call at ``bucket_rows``."""

    def __init__(self, linear: Linear, activation: Optional[str] = None, block: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        # dtype: the GEMM's (weights stored so, the input cast to it unless it comes so; the bias added and the
        # output returned in the weights' own dtype, after the GEMM); None: the weights' own
        self._dtype = None if dtype in (None, w.dtype) else dtype
        self._out_dtype = w.dtype  # a cast linear's output (its input may already be in the GEMM's dtype)
        self._weight = torch.ops.mkldnn._reorder_linear_weight(w.to(dtype or w.dtype).contiguous(), None)
        self._bias = None if linear.bias is None else linear.bias.detach().contiguous()
        self.activation = activation
        self._attr, self._algorithm = FUSABLE_ACTIVATIONS[activation] if activation else ("none", "")
        assert self._dtype is None or activation is None, "a cast linear fuses no activation"
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        n = rows.shape[0]
        if self.block is not None and n > self.block:
            return self._blocks(rows).view(*shape[:-1], self.out_features)
        m = bucket_rows(n) if self.block is None else -(-n // self.block) * self.block
        if m != n:  # padded to its bucket (see bucket_rows); the padding rows are zeros, dropped after
            padded = rows.new_empty(m, shape[-1], dtype=self._dtype or rows.dtype)
            padded[:n] = rows  # cast (where the GEMM's dtype differs) and padded in one copy
            padded[n:] = 0
            rows = padded
        elif self._dtype is not None and rows.dtype != self._dtype:
            rows = rows.to(self._dtype)
        rows = rows.contiguous()
        bias = self._bias if self._dtype is None else None
        y = torch.ops.mkldnn._linear_pointwise(rows, self._weight, bias, self._attr, [], self._algorithm)
        return self._output(y[:n] if m != n else y).view(*shape[:-1], self.out_features)

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        if self._dtype is not None:  # the bias added in the weights' dtype (the bf16 sums widened exactly)
            y = y.to(self._out_dtype) if self._bias is None else torch.add(self._bias, y).to(self._out_dtype)
        return y

    def _blocks(self, rows: torch.Tensor) -> torch.Tensor:
        """More rows than one block: the full blocks run on views of the rows, only the last one is copied
        (zero-padded); every call has ``block`` rows, as in the padded tensor."""
        if self._dtype is not None and rows.dtype != self._dtype:
            rows = rows.to(self._dtype)
        rows = rows.contiguous()
        n, b = rows.shape[0], self.block
        full = n - n % b
        bias = self._bias if self._dtype is None else None
        ys = [torch.ops.mkldnn._linear_pointwise(rows[i:i + b], self._weight, bias, self._attr, [], self._algorithm)
              for i in range(0, full, b)]
        if full < n:
            tail = rows.new_zeros(b, rows.shape[1])
            tail[:n - full] = rows[full:]
            ys.append(torch.ops.mkldnn._linear_pointwise(tail, self._weight, bias, self._attr, [],
                                                         self._algorithm)[:n - full])
        return self._output(torch.cat(ys))


def _linears(model: nn.Module):
    """Every ``Linear`` that may be swapped: not those marked ``swappable = False`` (a model that
    reads a layer's ``weight`` itself, as T5Gemma2's cross K/V projection does)."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, Linear) and getattr(child, "swappable", True)]


def pack_linears(model: nn.Module) -> int:
    """Swap every ``Linear`` of a loaded CPU model for a ``PackedLinear``; a module that declares
    ``fusable_activation`` (a ``FUSABLE_ACTIVATIONS`` key) and has a ``dense`` linear gets its
    activation fused and its own ``act`` set to the identity. bf16 weights run in blocks of FIXED_ROWS rows
    where ``batch_invariant_bf16()``. A model that ``pads_rows`` gets ``row_bucket`` set: it pads its
    token rows once per batch, so every linear runs at a bucket without copying its input. Returns how many
    were swapped."""
    memory.tune()  # before the first GEMM: allocator settings and oneDNN's primitive cache cap
    swaps = _linears(model)
    fixed = bool(swaps) and all(c.weight.dtype == torch.bfloat16 for _, _, c in swaps) and batch_invariant_bf16()
    for parent, name, child in swaps:
        act = getattr(parent, "fusable_activation", None) if name == "dense" else None
        if act not in FUSABLE_ACTIVATIONS:
            act = None
        setattr(parent, name, PackedLinear(child, act, FIXED_ROWS if fixed else None))
        if act is not None:
            parent.act = nn.Identity()
    if swaps and getattr(model, "pads_rows", False):
        # rows padded once per batch: no linear copies its input
        model.row_bucket = fixed_rows if fixed else bucket_rows
    return len(swaps)


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def has_vnni() -> bool:
    """Whether this CPU has the int8 dot-product instructions (AVX512-VNNI or AVX-VNNI)."""
    flags = _cpu_flags()
    return "avx512_vnni" in flags or "avx_vnni" in flags


def has_amx() -> bool:
    """Whether this CPU has AMX-BF16 tiles (Intel Sapphire Rapids and later)."""
    return "amx_bf16" in _cpu_flags()


def has_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_bf16() -> None:
    """Warn, once per model, where dtype bfloat16 runs on a CPU without bf16 instructions."""
    if not has_bf16():
        log.warning("this CPU has no bf16 instructions (avx512_bf16 or amx_bf16): dtype='bfloat16' runs its GEMMs "
                    "through conversions to float32 and may be slower than float32")


def smooth_factors(weight: torch.Tensor, act_max: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``s = max|x|^a / max|W|^(1-a)`` ([K], fp32)."""
    w_max = weight.detach().float().abs().amax(0).clamp_min(1e-5)
    return (act_max.float().clamp_min(1e-5) ** alpha / w_max ** (1 - alpha)).clamp(1e-4, 1e4)


class Int8Linear(nn.Module):
    """``act(x W^T + b)``: W int8 per output channel (SmoothQuant factor folded in), x quantized per
    row (kernels/int8_linear.py); x fp32. Weights are prepared once, here."""

    def __init__(self, linear: Linear, activation: Optional[str] = None, act_max: Optional[torch.Tensor] = None,
                 alpha: float = SMOOTH_ALPHA, out_dtype: torch.dtype = torch.float32):
        super().__init__()
        w = linear.weight.detach().float()
        # bfloat16: the output rounded to bf16 in the dequantization (for a bf16 down-projection that reads it
        # alone); oneDNN's GEMM only
        self.out_dtype = out_dtype
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        smooth = smooth_factors(w, act_max, alpha) if act_max is not None else None
        self._wq_t, self._w_scale, self._w_sum = kernels.prepare_int8_weight(w, smooth)
        # oneDNN's u8s8 GEMM on the codes packed once where it runs (the int8 codes are then not kept),
        # else torch._int_mm on them (kernels/int8_linear.py)
        self._packed = kernels.pack_int8_weight(self._wq_t) if kernels.onednn_int8_available() else None
        if self._packed is not None:
            self._wq_t = None
        self._inv_smooth = None if smooth is None else (1.0 / smooth).contiguous()
        self._bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.activation = activation  # a kernels.int8_linear activation ("gelu", "gelu_tanh") or None
        self.smoothed = smooth is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if self._packed is None:
            y = kernels.int8_linear(rows, self._wq_t, self._w_scale, self._w_sum, self._bias, self._inv_smooth,
                                    self.activation)
        else:  # at bucket_rows' row counts, as PackedLinear runs
            y = kernels.int8_linear_packed(rows, self._packed, self._w_scale, self._w_sum, self._bias,
                                           self._inv_smooth, self.activation, bucket_rows(rows.shape[0]),
                                           self.out_dtype)
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


def is_ffn_down(name: str, linear: nn.Module) -> bool:
    """Whether a linear is an FFN's down-projection (int8 keeps those in fp32: FFN_DOWN_NAMES)."""
    return name in FFN_DOWN_NAMES or getattr(linear, "ffn_down", False)


def quantize_linears(model: nn.Module, mode: str, act_max: Optional[Dict[nn.Module, torch.Tensor]] = None,
                     keep_ffn_down: bool = True) -> int:
    """Swap every ``Linear`` (fused ones included) of a loaded fp32 CPU model for an ``Int8Linear``,
    but the FFN's down-projections, which stay in float (packed for oneDNN where it is available: bf16 in
    fixed-row calls where the CPU has bf16 instructions, else fp32) unless
    ``keep_ffn_down`` is False; ``act_max`` (``calibrate``'s statistics) turns SmoothQuant on. A ``dense``
    layer of a module that declares a fusable activation gets it fused. Returns how many became int8."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if not has_vnni():
        log.warning("this CPU has no VNNI (avx512_vnni or avx_vnni): quantize='int8' runs its int8 GEMMs "
                    "without the int8 dot-product instructions and may be slower than float32")
    swaps = _linears(model)
    if any(child.weight.device.type != "cpu" or child.weight.dtype != torch.float32 for _, _, child in swaps):
        raise ValueError("quantize='int8' runs on CPU with dtype float32 weights")
    kept, downs = [], "fp32"
    if keep_ffn_down:
        kept = [(parent, name, child) for parent, name, child in swaps if is_ffn_down(name, child)]
        swaps = [s for s in swaps if not is_ffn_down(s[1], s[2])]
        if kept and onednn_available() and kernels.kernel_mode() != "torch":
            memory.tune()
            # bf16 where the CPU has bf16 instructions, in fixed-row calls (batch invariance, see FIXED_ROWS)
            bf16 = BF16_FFN_DOWN and has_bf16()
            downs = "bf16" if bf16 else downs
            for parent, name, child in kept:
                setattr(parent, name, PackedLinear(child, None, FIXED_ROWS, torch.bfloat16) if bf16
                        else PackedLinear(child))
    onednn_gemm = kernels.onednn_int8_available()
    # a module whose output the FFN's down-projection alone reads (``feeds_ffn_down``) hands it bf16 rows
    # from its dequantization, where the downs are bf16: no fp32 write, no cast
    bf16_feed = downs == "bf16" and onednn_gemm
    log.info("int8: %d linears int8 (%s GEMM, activations per row, SmoothQuant %s), %d FFN down-projections %s",
             len(swaps), "oneDNN u8s8" if onednn_gemm else "torch._int_mm", "on" if act_max else "off",
             len(kept) if keep_ffn_down else 0, downs)
    for parent, name, child in swaps:
        act = INT8_ACTIVATIONS.get(getattr(parent, "fusable_activation", None)) if name == "dense" else None
        feed = bf16_feed and act is not None and getattr(parent, "feeds_ffn_down", False)  # its act fused too
        out = torch.bfloat16 if feed else torch.float32
        setattr(parent, name, Int8Linear(child, act, None if act_max is None else act_max.get(child), out_dtype=out))
        if act is not None:
            parent.act = nn.Identity()
    if swaps and onednn_gemm and getattr(model, "pads_rows", False):
        # rows padded once per batch to bucket_rows: the int8 GEMMs run there without padding their codes
        model.row_bucket = bucket_rows
    return len(swaps)
