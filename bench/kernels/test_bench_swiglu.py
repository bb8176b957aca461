import pytest
import torch
from kernel_workloads import requires_cuda

from kernels.swiglu import swiglu_ref, swiglu_triton

pytestmark = requires_cuda


@pytest.mark.parametrize("tokens,inter", [(65536, 3072), (8192, 9728), (4096, 3072)])
def test_swiglu(bench_pair, tokens, inter):
    gate_up = torch.randn(tokens, 2 * inter, dtype=torch.bfloat16, device="cuda")
    nbytes = 3 * tokens * inter * gate_up.element_size()  # read gate, up; write out
    bench_pair(f"swiglu T={tokens} I={inter}", lambda: swiglu_triton(gate_up), lambda: swiglu_ref(gate_up),
               nbytes=nbytes)
