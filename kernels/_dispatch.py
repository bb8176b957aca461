"""Choose between a Triton kernel and its torch reference.

CUDA tensors go to Triton and CPU tensors to the reference, unless the
environment variable ``ENGINE_KERNELS`` forces one path everywhere:
``torch`` (A/B checks on a GPU) or ``triton`` (CPU tensors under
``TRITON_INTERPRET=1``).
"""
import os

import torch

_VALID = ("", "auto", "torch", "triton")


def kernel_mode() -> str:
    mode = os.environ.get("ENGINE_KERNELS")  # read per call (tests switch it); unset is the fast path
    if not mode:
        return "auto"
    mode = mode.strip().lower()
    if mode not in _VALID:
        raise ValueError(f"ENGINE_KERNELS={mode!r}: expected 'triton' or 'torch'")
    return mode or "auto"


def use_triton(t) -> bool:
    """Whether a tensor (or a device) goes to the Triton kernels."""
    is_cuda = t.is_cuda if isinstance(t, torch.Tensor) else torch.device(t).type == "cuda"
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if not is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("ENGINE_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return is_cuda


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
