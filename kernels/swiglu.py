"""SwiGLU activation on a fused ``gate_up`` projection: silu(gate) * up."""
import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up: [T, 2I] laid out as [gate | up]  ->  [T, I]
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(gate_up.dtype)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` from one ``[T, 2I]`` tensor, fp32 math."""
    if use_triton(gate_up):
        return swiglu_triton(gate_up)
    return swiglu_ref(gate_up)
