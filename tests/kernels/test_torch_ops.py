"""Every kernel is a registered torch op: schema, fake (meta) kernel and dispatch checked by opcheck.

``torch.library.opcheck`` runs each op on real inputs and checks that the
declared schema matches what the kernel mutates and aliases, that the fake
kernel gives the real outputs' shapes, dtypes and strides, and that the op
traces under AOT dispatch with dynamic shapes (what ``torch.compile`` does).
On CPU the kernel behind the op is the C++ kernel (csrc/) under the default
mode, the torch reference under ``ENGINE_KERNELS=torch``, and the Triton
kernel in the interpreter under ``ENGINE_KERNELS=triton``.
"""
import pytest
import torch

import kernels
from kernels_ops_cases import cases

OPS = {"swiglu", "rms_norm", "add_rms_norm", "yes_no_head", "qk_norm_rope_", "varlen_attention",
       "paged_attention", "causal_conv1d", "gated_delta_rule", "layer_norm", "mean_pool", "int8_linear"}

CASES = cases()


def test_every_kernel_is_an_op_with_a_case():
    registered = {name for name in dir(torch.ops.engine) if not name.startswith("_")} & OPS
    assert registered == OPS
    assert {name for name, _, _ in CASES} == OPS
    for name in OPS:  # CPU and CUDA kernels and a fake, all under one schema
        op = getattr(torch.ops.engine, name).default
        for key in ("CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), (name, key)


@pytest.mark.parametrize("mode", ["torch", "triton", "auto"])
@pytest.mark.parametrize("name,args,kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_opcheck(name, args, kwargs, mode, monkeypatch):
    monkeypatch.setenv("ENGINE_KERNELS", mode)
    op = getattr(torch.ops.engine, name).default
    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args, kwargs)


@pytest.mark.filterwarnings("ignore:Warning only once for all operators")  # we override a kernel on purpose
def test_public_functions_dispatch_through_the_ops():
    # Overriding the op's CPU kernel changes what the public function computes: it runs the op.
    x = torch.randn(5, 8)
    seen = []
    with torch.library._scoped_library("engine", "IMPL") as lib:
        def spy(gate_up):
            seen.append(tuple(gate_up.shape))
            return torch.full((5, 4), 7.0)
        lib.impl("swiglu", spy, "CPU")
        assert torch.equal(kernels.swiglu(x), torch.full((5, 4), 7.0))
    assert seen == [(5, 8)]
    assert torch.equal(kernels.swiglu(x), torch.ops.engine.swiglu(x))
