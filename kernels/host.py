"""Host-side plumbing shared by the engine and the kernels' wrappers.

``to_device``: per-batch metadata (offsets, positions, block tables) goes to a CUDA device through
pinned host memory with a non-blocking copy, so the host goes on planning while the copy runs
in stream order; PyTorch's caching host allocator keeps the pinned buffer until the copy is done.
On a CPU device it is a plain tensor: nothing is pinned on a machine without CUDA.

``bind_device``: a thread that launches kernels on one CUDA device makes it the thread's current
device (Triton launches on the current device) and gives Triton its scratch allocator there.
"""
from typing import Optional

import torch


def to_device(data, dtype: torch.dtype, device: Optional[torch.device]) -> torch.Tensor:
    """``data`` (a list, a nested list or a CPU tensor) as a ``dtype`` tensor on ``device``."""
    t = data.to(dtype) if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device is None:
        return t
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def bind_device(device: torch.device) -> None:
    """Make ``device`` (a CUDA device) the calling thread's: its current device, and Triton's
    allocator for device-side tensor descriptors (TMA scratch) on it. A CPU device: nothing."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    import triton

    from . import attention

    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    torch.cuda.set_device(device)
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device=device, dtype=torch.int8))
    attention._ALLOCATOR.set = True  # this thread's allocator is set: the attention wrapper keeps it
