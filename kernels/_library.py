"""The kernels as torch operators, namespace ``engine`` (``torch.ops.engine.*``).

Each op has one schema, a CPU kernel (the pure-torch reference) and a CUDA
kernel (the Triton kernel), so dispatch follows the device, and a fake
(meta) implementation, so ``torch.compile(fullgraph=True)`` traces through
it without running it. ``ENGINE_KERNELS=triton|torch`` swaps the kernel
behind either device key (A/B checks on a GPU, Triton's interpreter on CPU).

On CPU an op with a C++ kernel (csrc/, loaded by kernels/_csrc.py) runs it when
the extension is available; otherwise, and always under ``ENGINE_KERNELS=torch``,
it runs the torch reference.

Ops may not return an input or a view of one, so in-place kernels are
declared as mutating ops that return nothing, and an output that is absent
(no final state requested) is an empty tensor; the public functions beside
each kernel turn those back into views and ``None``.
"""
import inspect
from typing import Callable, Optional, Sequence

import torch

from . import _csrc
from ._dispatch import kernel_mode, use_triton

NAMESPACE = "engine"


def engine_op(name: str, ref: Callable, triton: Callable, fake: Callable,
              mutates_args: Sequence[str] = (), schema: Optional[Callable] = None,
              cpu: Optional[Callable] = None):
    """Register ``engine::name``; its schema is inferred from ``schema``'s annotated
    signature (``ref``'s by default; torch wants every tensor argument positional).

    The kernels and the fake are called with keyword arguments of the schema's
    names; ``triton`` may take extra keyword-only tuning arguments (left at their
    defaults). Pass a lambda that looks the kernel up at call time where tests spy
    on the module's function. ``cpu(ext, **args)`` runs the C++ kernel of the loaded
    extension ``ext`` (kernels/_csrc.py) with the schema's arguments.
    """
    sig = inspect.signature(schema or ref)

    def named(fn):
        def call(*args, **kwargs):
            return fn(**sig.bind(*args, **kwargs).arguments)
        return call

    cpu_ref, cpu_triton, cuda_ref, cuda_triton = named(ref), named(triton), named(ref), named(triton)

    def on_cpu(*args, **kwargs):
        # use_triton raises for ENGINE_KERNELS=triton without the interpreter.
        if use_triton(args[0]):
            return cpu_triton(*args, **kwargs)
        if cpu is not None and kernel_mode() != "torch":
            ext = _csrc.module()
            if ext is not None:
                return cpu(ext, **sig.bind(*args, **kwargs).arguments)
        return cpu_ref(*args, **kwargs)

    def on_cuda(*args, **kwargs):
        return (cuda_ref if kernel_mode() == "torch" else cuda_triton)(*args, **kwargs)

    on_cpu.__signature__ = sig
    on_cpu.__name__ = name
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", on_cpu, mutates_args=tuple(mutates_args),
                                 device_types="cpu")
    op.register_kernel("cuda")(on_cuda)
    op.register_fake(named(fake))
    return op


def empty_state(x: torch.Tensor) -> torch.Tensor:
    """The stand-in for a final state that was not asked for."""
    return x.new_empty((0,), dtype=torch.float32)
