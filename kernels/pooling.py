"""Mean pooling over packed sequences, with optional L2 normalisation (sentence-transformers'
Pooling(mean) + Normalize).

hidden [T, H] (any float dtype), cu_seqlens [n + 1] -> [n, H] fp32. CPU: the C++ kernel
(csrc/) when built; CUDA: the reference.
"""
import torch
import torch.nn.functional as F

from ._library import engine_op


def mean_pool_ref(hidden: torch.Tensor, cu_seqlens: torch.Tensor, normalize: bool) -> torch.Tensor:
    h = hidden.float()
    cu = cu_seqlens.long()
    n = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(n, device=h.device), lens, output_size=h.shape[0])  # [T]
    emb = torch.zeros(n, h.shape[1], device=h.device).index_add_(0, seq, h) / lens.clamp_min(1).float()[:, None]
    return F.normalize(emb, p=2, dim=-1) if normalize else emb


mean_pool_op = engine_op(
    "mean_pool", mean_pool_ref, mean_pool_ref,
    lambda hidden, cu_seqlens, normalize: hidden.new_empty((cu_seqlens.shape[0] - 1, hidden.shape[1]),
                                                           dtype=torch.float32),
    cpu=lambda ext, hidden, cu_seqlens, normalize: ext.mean_pool(hidden, cu_seqlens, normalize))


def mean_pool(hidden, cu_seqlens, normalize=False):
    """Per-sequence mean of packed rows, L2-normalised if asked (``torch.ops.engine.mean_pool``)."""
    return mean_pool_op(hidden, cu_seqlens, bool(normalize))
