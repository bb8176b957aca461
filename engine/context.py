"""Per-batch metadata, built once by the runner and read by every layer.

Models know nothing about batching: they run one flat token tensor and read
sequence boundaries from this object (FlashInfer's plan/run split: the runner
plans, the layers run).

Shared prefixes: sequence i may attend to a cached prefix segment
(``prefix_index[i] >= 0``); its positions then continue after that prefix.
Layer l reads the segments of the batch, packed, through ``prefix_kv(l)``.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from kernels.host import to_device


@dataclass
class BatchContext:
    cu_seqlens: torch.Tensor  # [n + 1] int32, token offsets of each sequence
    max_seqlen: int
    positions: torch.Tensor  # [T] int64, restart at 0 (or at the prefix length) per sequence
    last_index: torch.Tensor  # [n] int64, cu_seqlens[1:] - 1
    seq_lens: List[int]
    token_type_ids: Optional[torch.Tensor] = None  # [T] int64, BERT-style segment ids
    # Shared prefixes (causal LLM rerankers)
    prefixes: Optional[list] = None  # distinct engine.core.cache.PrefixKV entries used by this batch
    prefix_index: Optional[torch.Tensor] = None  # [n] int32, segment of each sequence, -1 for none
    cu_seqlens_p: Optional[torch.Tensor] = None  # [n_prefix + 1] int32
    max_seqlen_p: int = 0
    # The head reads only each sequence's last token: the model may return [n, H] rows for them
    # (then last_index becomes arange(n) and cu_last [n + 1] is the one-query-per-sequence layout).
    last_only: bool = False
    cu_last: Optional[torch.Tensor] = None
    # When a list, attention layers append their (k, v) [T, Hkv, D] to it (prefix computation).
    capture_kv: Optional[list] = None
    # When a list, linear-attention layers append their final (conv [n, C, K-1], recurrent
    # [n, Hv, Dk, Dv]) states per sequence to it (prefix computation, decode prefill).
    capture_state: Optional[list] = None
    # Decoding (engine.core.decode.DecodeCache): layers attend over / step its per-sequence caches.
    cache: Optional[object] = None
    # Encoder-decoder (KaLM): the batch's cross K/V, block tables into the paged passage cache.
    cross: Optional[object] = None
    # Linear-attention models (Qwen3.5): the Triton DeltaNet kernels' chunk plan, built by the
    # model's plan() before the forward ({} for the torch references; None: built in the forward).
    linear_plan: Optional[dict] = None
    # Multimodal models (Qwen3-VL): the batch's images and M-RoPE positions, built by the model's plan.
    multimodal: Optional[object] = None
    _packed: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.seq_lens))

    def prefix_kv(self, layer: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Packed prefix K/V of this batch for one layer: a view for one prefix, one concat for several."""
        if not self.prefixes:
            return None, None
        if len(self.prefixes) == 1:
            return self.prefixes[0].k[layer], self.prefixes[0].v[layer]
        if layer not in self._packed:
            self._packed[layer] = (torch.cat([p.k[layer] for p in self.prefixes]),
                                   torch.cat([p.v[layer] for p in self.prefixes]))
        return self._packed[layer]

    def prefix_state(self, layer: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Linear-attention layer ``layer``'s prefix states, one row per distinct prefix (read
        through ``prefix_index``): (conv [n_prefix, C, K-1], recurrent [n_prefix, Hv, Dk, Dv])."""
        if not self.prefixes or self.prefixes[0].conv_state is None:
            return None, None
        key = ("state", layer)
        if key not in self._packed:
            self._packed[key] = (torch.stack([p.conv_state[layer] for p in self.prefixes]),
                                 torch.stack([p.recurrent_state[layer] for p in self.prefixes]))
        return self._packed[key]


def _cumsum(lens: Sequence[int]) -> List[int]:
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return cu


def build_context(seqs: Sequence[Sequence[int]], device: torch.device,
                  token_types: Optional[Sequence[Sequence[int]]] = None,
                  prefixes: Optional[list] = None,
                  prefix_index: Optional[Sequence[int]] = None) -> "tuple[torch.Tensor, BatchContext]":
    """Pack token lists into (input_ids [T], context). Host work happens once here.

    ``prefixes``: distinct PrefixKV entries; ``prefix_index[i]`` picks sequence i's (-1: none).
    """
    lens = [len(s) for s in seqs]
    if any(n == 0 for n in lens):
        raise ValueError("cannot run an empty sequence")
    flat = [t for s in seqs for t in s]
    cu = _cumsum(lens)
    if prefix_index is not None:
        starts = [prefixes[j].num_tokens if j >= 0 else 0 for j in prefix_index]
    else:
        starts = [0] * len(lens)
    positions = torch.cat([torch.arange(s, s + n, dtype=torch.int64) for s, n in zip(starts, lens)])
    ctx = BatchContext(
        cu_seqlens=to_device(cu, torch.int32, device),
        max_seqlen=max(lens),
        positions=to_device(positions, torch.int64, device),
        last_index=to_device([c - 1 for c in cu[1:]], torch.int64, device),
        seq_lens=lens,
    )
    if token_types is not None:
        assert [len(t) for t in token_types] == lens, "token_types must match the sequences"
        ctx.token_type_ids = to_device([t for s in token_types for t in s], torch.int64, device)
    if prefixes:
        assert prefix_index is not None and len(prefix_index) == len(lens)
        plens = [p.num_tokens for p in prefixes]
        ctx.prefixes = list(prefixes)
        ctx.prefix_index = to_device(list(prefix_index), torch.int32, device)
        ctx.cu_seqlens_p = to_device(_cumsum(plens), torch.int32, device)
        ctx.max_seqlen_p = max(plens)
    ids = to_device(flat, torch.int64, device)
    return ids, ctx
