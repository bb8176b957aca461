"""What every model declares, and the default batch planning.

Capabilities are class attributes read by the runner and the API; nothing probes
a model with getattr. ``plan`` turns a batch of typed sequences into the model's
batch context (FlashInfer's plan/run split): the default packs tokens, positions,
segment ids and shared prefixes; a family overrides it to add what it needs
(KaLM's block tables, M-RoPE positions).
"""
from typing import List, Optional, Tuple

import torch
from torch import nn

from engine.context import BatchContext, build_context
from engine.sequence import Seq


class EngineModel(nn.Module):
    supports_prefix = False  # a shared prefix's K/V (and linear-attention states) can be reused
    supports_last_only = False  # forward honours ctx.last_only (the last layer for the last rows alone)
    supports_decode = False  # forward honours ctx.cache (greedy decoding with a KV cache)
    is_encoder_decoder = False  # encode() passages, forward() decodes prompts against their cross K/V
    # The forward can pad its token rows once per batch to ``row_bucket(T)`` rows (a GEMM row count from
    # engine/models/cpu_linear.bucket_rows, set on the instance by pack_linears; None: exact rows).
    pads_rows = False
    row_bucket = None
    # Checkpoint names: prefixes stripped before matching, and names or prefixes never loaded.
    checkpoint_prefixes: Tuple[str, ...] = ("model.",)
    ignored_checkpoint_names: Tuple[str, ...] = ()
    ignored_checkpoint_prefixes: Tuple[str, ...] = ()
    # Checkpoint name -> (our fused parameter, shard id), e.g. {"q_proj": ("qkv_proj", "q")}.
    packed_modules_mapping: dict = {}

    @classmethod
    def max_input_length(cls, cfg) -> Optional[int]:
        """The longest input the model's positions allow (learned position tables), or None (RoPE)."""
        return None

    def plan(self, seqs: List[Seq], device: torch.device, prefixes: Optional[list] = None,
             prefix_index: Optional[List[int]] = None, **extra) -> "tuple[torch.Tensor, BatchContext]":
        """(input_ids [T], context) of a batch; host work happens once here."""
        types = None
        if any(s.token_types is not None for s in seqs):
            types = [s.token_types if s.token_types is not None else [0] * s.cost for s in seqs]
        return build_context([s.token_ids for s in seqs], device, types, prefixes, prefix_index)
