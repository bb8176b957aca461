"""Small ragged inputs for every engine op (shared by the opcheck and compile tests)."""
import torch

from kernels.gated_delta_rule import chunk_plan
from kernels.int8_linear import prepare_int8_weight
from kernels.qk_norm_rope import rope_cos_sin


def cases(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    lens = [3, 1, 6]
    cu = torch.tensor([0, 3, 4, 10], dtype=torch.int32)
    T = sum(lens)
    out = []
    out.append(("swiglu", (rand(T, 16),), {}))
    out.append(("rms_norm", (rand(T, 32), rand(32), 1e-6), {"offset": 1.0}))
    out.append(("add_rms_norm", (rand(T, 32), rand(T, 32), rand(32), 1e-6), {}))
    out.append(("layer_norm", (rand(T, 24), None, rand(24), rand(24), 1e-12), {}))
    out.append(("layer_norm", (rand(T, 24), rand(T, 24), rand(24), rand(24), 1e-12), {}))
    out.append(("mean_pool", (rand(T, 24), cu, True), {}))
    last = torch.tensor([2, 3, 9])
    out.append(("yes_no_head", (rand(T, 32), last, rand(32), rand(32), 1e-6), {}))
    out.append(("yes_no_head", (rand(T, 32), last, rand(32), rand(32), 1e-6), {"residual": rand(T, 32),
                                                                                  "offset": 1.0}))
    cos, sin = rope_cos_sin(torch.tensor([0, 1, 2, 0, 0, 1, 2, 3, 4, 5]), 8, 10000.0)
    out.append(("qk_norm_rope_", (rand(T, (4 + 2 * 2) * 8), rand(8), rand(8), cos, sin, 4, 2, 8, 1e-6), {}))
    out.append(("qk_norm_rope_", (rand(T, (2 + 2 * 1) * 8), None, None, cos, sin, 2, 1, 8, 1e-6), {}))
    q, k, v = rand(T, 4, 16), rand(T, 2, 16), rand(T, 2, 16)
    for causal in (True, False):
        out.append(("varlen_attention", (q, k, v, cu, cu, causal, 0.25), {"max_seqlen_q": 6, "max_seqlen_k": 6}))
    out.append(("varlen_attention", (q, k, v, cu, cu, True, 0.25),
                {"prefix_k": rand(5, 2, 16), "prefix_v": rand(5, 2, 16),
                 "cu_seqlens_p": torch.tensor([0, 2, 5], dtype=torch.int32),
                 "prefix_index": torch.tensor([1, -1, 0], dtype=torch.int32)}))
    out.append(("paged_attention", (q, k, v, cu, 0.25), {"window_left": 2, "window_right": 1}))
    page = 4
    k_cache, v_cache = rand(5, page, 2, 16), rand(5, page, 2, 16)
    tables = torch.tensor([[0, 3], [1, 1], [4, 2]], dtype=torch.int32)
    out.append(("paged_attention", (q, k, v, cu, 0.25),
                {"window_left": None, "window_right": 1, "k_cache": k_cache, "v_cache": v_cache,
                 "block_tables": tables, "cross_lens": torch.tensor([5, 0, 8], dtype=torch.int32)}))
    w = rand(12, 4)
    out.append(("causal_conv1d", (rand(T, 12), w, cu), {}))
    out.append(("causal_conv1d", (rand(T, 12), w, cu),
                {"initial_state": rand(2, 12, 3), "state_index": torch.tensor([1, -1, 0], dtype=torch.int32),
                 "output_final_state": True}))
    hk, hv, dk, dv = 2, 4, 16, 16
    gq, gk, gv = rand(T, hk, dk), rand(T, hk, dk), rand(T, hv, dv)
    gg = -torch.rand(T, hv, generator=g)
    beta = torch.rand(T, hv, generator=g)
    plan = chunk_plan(lens)
    out.append(("gated_delta_rule", (gq, gk, gv, gg, beta, cu),
                {"output_final_state": True, "max_seqlen": 6, "chunks": plan.chunks, "chunk": plan.chunk}))
    out.append(("gated_delta_rule", (gq, gk, gv, gg, beta, cu),
                {"initial_state": rand(2, hv, dk, dv), "state_index": torch.tensor([0, -1, 1], dtype=torch.int32),
                 "max_seqlen": 6, "chunks": plan.chunks, "chunk": plan.chunk}))
    wq_t, w_scale, w_sum = prepare_int8_weight(rand(12, 16), torch.rand(16, generator=g) + 0.5)
    out.append(("int8_linear", (rand(T, 16), wq_t, w_scale, w_sum, rand(12), 1.0 / (torch.rand(16, generator=g) + 0.5),
                                1), {}))
    out.append(("int8_linear", (rand(T, 16), wq_t, w_scale, w_sum, None, None, 0), {}))
    one = torch.arange(4, dtype=torch.int32)
    out.append(("gated_delta_rule", (gq[:3], gk[:3], gv[:3], gg[:3], beta[:3], one),
                {"initial_state": rand(3, hv, dk, dv), "state_index": torch.tensor([2, 0, 1], dtype=torch.int32),
                 "output_final_state": True, "max_seqlen": 1}))
    return out
