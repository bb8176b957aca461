"""Final-state stores at indices past 2^31: compiled (sm_90, meta tensors), their addresses are int64.

``n * stride`` of two i32 values wraps at 2^31 (8,193 delta-rule states of [16, 128, 128];
100,000 conv states of [8,192, 3]). The probe compiles each kernel at such a shape, as a
JIT launch on that GPU would specialise it, and reads the integer width of every offset
added to the ``FINAL`` pointer in the Triton IR. Two toy kernels, one with ``n * stride``
and one with ``n.to(tl.int64) * stride``, show that the check tells the two apart.
The probe runs in a subprocess: these tests run the kernels in the interpreter.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_compile_gpu import _ptxas

pytestmark = pytest.mark.skipif(_ptxas() is None,
                                reason="the triton wheel ships no ptxas (triton/backends/nvidia/bin/ptxas)")


@pytest.fixture(scope="module")
def widths():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = Path(__file__).with_name("int64_probe.py")
    proc = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_check_sees_an_i32_offset(widths):
    assert widths["toy i32"] == ["32"]
    assert widths["toy i64"] == ["64"]


@pytest.mark.parametrize("case", ["conv1d final state", "delta rule final state"])
def test_final_state_offsets_are_int64(widths, case):
    assert widths[case], f"{case}: no store address built from FINAL was found"
    assert set(widths[case]) == {"64"}, f"{case}: offsets of widths {widths[case]} (an i32 one wraps past 2^31)"
