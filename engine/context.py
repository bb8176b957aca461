"""Per-batch metadata, built once by the runner and read by every layer.

Models know nothing about batching: they run one flat token tensor and read
sequence boundaries from this object (FlashInfer's plan/run split: the runner
plans, the layers run).
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass
class BatchContext:
    cu_seqlens: torch.Tensor  # [n + 1] int32, token offsets of each sequence
    max_seqlen: int
    positions: torch.Tensor  # [T] int64, restart at 0 per sequence
    last_index: torch.Tensor  # [n] int64, cu_seqlens[1:] - 1
    seq_lens: List[int]
    token_type_ids: Optional[torch.Tensor] = None  # [T] int64, BERT-style segment ids

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.seq_lens))


def build_context(seqs: Sequence[Sequence[int]], device: torch.device,
                  token_types: Optional[Sequence[Sequence[int]]] = None) -> "tuple[torch.Tensor, BatchContext]":
    """Pack token lists into (input_ids [T], context). Host work happens once here."""
    lens = [len(s) for s in seqs]
    if any(n == 0 for n in lens):
        raise ValueError("cannot run an empty sequence")
    flat = [t for s in seqs for t in s]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lens])
    cu_t = torch.tensor(cu, dtype=torch.int32)
    ctx = BatchContext(
        cu_seqlens=cu_t.to(device, non_blocking=True),
        max_seqlen=max(lens),
        positions=positions.to(device, non_blocking=True),
        last_index=(cu_t[1:].long() - 1).to(device, non_blocking=True),
        seq_lens=lens,
    )
    if token_types is not None:
        assert [len(t) for t in token_types] == lens, "token_types must match the sequences"
        ctx.token_type_ids = torch.tensor([t for s in token_types for t in s], dtype=torch.int64).to(device)
    ids = torch.tensor(flat, dtype=torch.int64).to(device, non_blocking=True)
    return ids, ctx
