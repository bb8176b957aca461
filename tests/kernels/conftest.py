"""Kernel tests: Triton kernels against their torch references.

Without a GPU the kernels run in Triton's interpreter, which must be switched
on before ``triton.jit`` decorates anything, hence the env set at import.
With ``TRITON_INTERPRET=0`` on a CUDA machine the same tests run compiled.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # plain `pytest` (not `python -m pytest`) from anywhere
    sys.path.insert(0, _ROOT)

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernel_helpers import DEVICE, INTERPRETED, assert_close  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _kernel_mode():
    if DEVICE == "cpu" and not INTERPRETED:
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    # Someone may import the kernels before this conftest sets the env (e.g. an
    # engine test collected first): then they are compiled JIT functions and
    # fail on CPU tensors with an obscure error. Say so plainly instead.
    if INTERPRETED:
        from triton.runtime.interpreter import InterpretedFunction

        from kernels.rms_norm import _rms_norm_kernel

        if not isinstance(_rms_norm_kernel, InterpretedFunction):
            pytest.fail("kernels were imported before TRITON_INTERPRET=1 was set; set it in tests/conftest.py")


@pytest.fixture(autouse=True)
def _fresh_seed_and_env(request, monkeypatch):
    # Fresh random inputs for every test case, reproducible from its id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    monkeypatch.delenv("ENGINE_KERNELS", raising=False)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def poison(monkeypatch):
    """Fill every new floating-point torch.empty / empty_like with NaN, so that an
    output element the kernel never writes shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(empty_like(*a, **k)))


@pytest.fixture
def close():
    return assert_close
