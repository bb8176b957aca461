import pytest
import torch
from kernel_workloads import requires_cuda

from kernels.rms_norm import rms_norm_ref, rms_norm_triton

pytestmark = requires_cuda


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("tokens,hidden", [(262144, 1024), (32768, 2560), (4096, 1024)])
def test_rms_norm_residual(bench_pair, tokens, hidden, dtype):
    x = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
    r = torch.randn_like(x)
    w = torch.randn(hidden, dtype=dtype, device="cuda")
    nbytes = 4 * x.numel() * x.element_size()  # read x, r; write out, x + r
    bench_pair(f"rms_norm+residual T={tokens} H={hidden}",
               lambda: rms_norm_triton(x, w, 1e-6, residual=r),
               lambda: rms_norm_ref(x, w, 1e-6, residual=r), nbytes=nbytes)
