import pytest
import torch
from kernel_workloads import NO_ID, QWEN3_0_6B, YES_ID, cu_seqlens, requires_cuda, rerank_lengths, yes_no_full_vocab

from kernels.yes_no_head import yes_no_head_triton

pytestmark = requires_cuda


@pytest.mark.parametrize("n_seqs", [1024, 64])
def test_yes_no_head_vs_full_vocab(bench_pair, n_seqs):
    h, vocab = QWEN3_0_6B["hidden"], QWEN3_0_6B["vocab"]
    cu = cu_seqlens(rerank_lengths(n_seqs), "cuda")
    hidden = torch.randn(int(cu[-1]), h, dtype=torch.bfloat16, device="cuda")
    last = (cu[1:] - 1).long()
    norm_w = torch.randn(h, dtype=torch.bfloat16, device="cuda")
    lm_head = torch.randn(vocab, h, dtype=torch.bfloat16, device="cuda") / h**0.5
    w = lm_head[YES_ID].float() - lm_head[NO_ID].float()
    nbytes = n_seqs * h * hidden.element_size()  # the gathered rows (weights are noise)
    bench_pair(f"yes_no_head n={n_seqs} vs vocab {vocab}",
               lambda: yes_no_head_triton(hidden, last, norm_w, w, 1e-6),
               lambda: yes_no_full_vocab(hidden, last, norm_w, lm_head, 1e-6), nbytes=nbytes)
