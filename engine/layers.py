"""Leaf layers shared by the model files. They take plain scalars, never a config.

Fused projections (qkv, gate_up) are one weight whose shards are filled by the
loader through ``weight_loader(param, tensor, shard_id)``.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

import kernels


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    assert shard_id is None
    if param.shape != loaded.shape:
        raise ValueError(f"shape {tuple(loaded.shape)} != expected {tuple(param.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim.

    ``shards`` maps a shard id (e.g. "q", "k", "v" or 0, 1) to its output size,
    in storage order.
    """

    def __init__(self, in_features: int, shards: Dict, bias: bool = False):
        super().__init__(in_features, sum(shards.values()), bias)
        self.shard_slices = {}
        off = 0
        for sid, size in shards.items():
            self.shard_slices[sid] = (off, size)
            off += size
        self.weight.weight_loader = self._load_shard
        if self.bias is not None:
            self.bias.weight_loader = self._load_shard
        self.weight.shard_ids = tuple(shards)
        if self.bias is not None:
            self.bias.shard_ids = tuple(shards)

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        off, size = self.shard_slices[shard_id]
        dst = param.data.narrow(0, off, size)
        if dst.shape != loaded.shape:
            raise ValueError(f"shape {tuple(loaded.shape)} != expected {tuple(dst.shape)} (shard {shard_id!r})")
        dst.copy_(loaded)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (offset + w), fp32 math; fused residual add."""

    def __init__(self, hidden_size: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        out, res = kernels.rms_norm(x, self.weight, self.eps, residual=residual, offset=self.offset)
        return out if residual is None else (out, res)


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
