"""SwiGLU activation on a fused ``gate_up`` projection: silu(gate) * up."""
import torch
import torch.nn.functional as F

from ._library import engine_op
from ._utils import FLOAT_DTYPES, check_tensor, next_pow2, require_triton, unit_stride_last, warps_for

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still imports without Triton
    from ._utils import tl_stub as tl, triton_stub as triton


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up: [T, 2I] laid out as [gate | up]  ->  [T, I]
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(gate_up.dtype)


@triton.jit(do_not_specialize=["n_rows"])  # batch-dependent: one binary for every batch
def _swiglu_kernel(
    GU, Y,  # gate_up [T, 2I], out [T, I]
    n_rows, n_cols,  # T, I
    stride_gu, stride_y,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows = rows.to(tl.int64)[:, None]
    gate_ptrs = GU + rows * stride_gu + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + n_cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(Y + rows * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def swiglu_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton ``silu(gate) * up`` for ``gate_up [..., 2I]`` laid out as [gate | up]; returns ``[..., I]``."""
    require_triton()
    check_tensor(gate_up, "gate_up", dtypes=FLOAT_DTYPES)
    two_i = gate_up.shape[-1]
    if two_i % 2:
        raise ValueError(f"gate_up last dim must be even ([gate | up]), got {two_i}")
    inter = two_i // 2
    x = unit_stride_last(gate_up.reshape(-1, two_i))
    n_rows = x.shape[0]
    out = torch.empty((n_rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if n_rows > 0 and inter > 0:
        block_n = min(next_pow2(inter), 1024)
        block_m = max(1, 4096 // block_n)  # by the width alone: every batch size runs one variant
        grid = (triton.cdiv(n_rows, block_m), triton.cdiv(inter, block_n))
        _swiglu_kernel[grid](
            x, out, n_rows, inter, x.stride(0), out.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps_for(block_m * block_n),
        )
    return out.view(*gate_up.shape[:-1], inter)


def _swiglu_fake(gate_up: torch.Tensor) -> torch.Tensor:
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


swiglu_op = engine_op(
    "swiglu", swiglu_ref, lambda **kw: swiglu_triton(**kw),
    _swiglu_fake, cpu=lambda ext, gate_up: ext.swiglu(gate_up))


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` from one ``[T, 2I]`` tensor, fp32 math (``torch.ops.engine.swiglu``)."""
    return swiglu_op(gate_up)
