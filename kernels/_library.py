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
# The low-level registration (define + impl): torch.library.custom_op wraps every call in a
# dynamo-disabled Python frame, several times the per-call cost of this one on CPU.
_LIB = torch.library.Library(NAMESPACE, "DEF")


def engine_op(name: str, ref: Callable, triton: Callable, fake: Callable,
              mutates_args: Sequence[str] = (), schema: Optional[Callable] = None,
              cpu: Optional[Callable] = None):
    """Register ``engine::name``; its schema is inferred from ``schema``'s annotated
    signature (``ref``'s by default; every tensor argument must be positional).

    The kernels and the fake are called with keyword arguments of the schema's
    names; ``triton`` may take extra keyword-only tuning arguments (left at their
    defaults). Pass a lambda that looks the kernel up at call time where tests spy
    on the module's function. ``cpu(ext, **args)`` runs the C++ kernel of the loaded
    extension ``ext`` (kernels/_csrc.py) with the schema's arguments. Returns the op
    (``torch.ops.engine.<name>.default``).
    """
    proto = schema or ref
    names = list(inspect.signature(proto).parameters)

    def named(fn):
        def call(*args, **kwargs):
            return fn(**dict(zip(names, args)), **kwargs)
        return call

    cpu_ref, cpu_triton, cuda_ref, cuda_triton = named(ref), named(triton), named(ref), named(triton)

    def on_cpu(*args, **kwargs):
        # use_triton raises for ENGINE_KERNELS=triton without the interpreter.
        if use_triton(args[0]):
            return cpu_triton(*args, **kwargs)
        if cpu is not None and kernel_mode() != "torch":
            ext = _csrc.module()
            if ext is not None:
                return cpu(ext, **dict(zip(names, args)), **kwargs)
        return cpu_ref(*args, **kwargs)

    def on_cuda(*args, **kwargs):
        return (cuda_ref if kernel_mode() == "torch" else cuda_triton)(*args, **kwargs)

    _LIB.define(name + torch.library.infer_schema(proto, mutates_args=tuple(mutates_args)))
    _LIB.impl(name, on_cpu, "CPU")
    _LIB.impl(name, on_cuda, "CUDA")
    torch.library.register_fake(f"{NAMESPACE}::{name}", named(fake), lib=_LIB)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def empty_state(x: torch.Tensor) -> torch.Tensor:
    """The stand-in for a final state that was not asked for."""
    return x.new_empty((0,), dtype=torch.float32)
