import pytest
import torch
from kernel_workloads import requires_cuda

from kernels.qk_norm_rope import qk_norm_rope_ref, qk_norm_rope_triton, rope_cos_sin

pytestmark = requires_cuda


@pytest.mark.parametrize("tokens,hq,hkv,d", [(65536, 16, 8, 128), (16384, 32, 8, 128), (4096, 16, 8, 128)])
def test_qk_norm_rope(bench_pair, tokens, hq, hkv, d):
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=torch.bfloat16, device="cuda")
    cos, sin = rope_cos_sin(torch.arange(tokens, device="cuda") % 512, d, 1e6)
    qw = torch.randn(d, dtype=torch.bfloat16, device="cuda")
    kw = torch.randn(d, dtype=torch.bfloat16, device="cuda")
    # read + write q and k, read cos/sin (in place, so repeated calls are fine to time)
    nbytes = 2 * tokens * (hq + hkv) * d * qkv.element_size() + 2 * cos.numel() * 4
    bench_pair(f"qk_norm_rope T={tokens} Hq={hq} Hkv={hkv} D={d}",
               lambda: qk_norm_rope_triton(qkv, qw, kw, cos, sin, hq, hkv, d, 1e-6),
               lambda: qk_norm_rope_ref(qkv, qw, kw, cos, sin, hq, hkv, d, 1e-6), nbytes=nbytes)
