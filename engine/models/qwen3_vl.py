"""Qwen3-VL (Qwen3-VL-Reranker, Qwen3-VL-Embedding): a ViT over image patches and Qwen3's decoder.

Reads top-down: vision tower (patch embedding -> learned position embedding resampled to
the patch grid -> 2D rotary -> pre-LayerNorm blocks -> 2x2 patch merger, and DeepStack
mergers after some blocks) -> language model (Qwen3's decoder layers, imported, with
interleaved M-RoPE) -> Qwen3VLModel, scoring as transformers' Qwen3VLForConditionalGeneration does.

Images of a batch run packed through the vision tower, one bidirectional attention
sequence per image (``kernels.varlen_attention``). Their merged features replace the
``<|image_pad|>`` embeddings; the i-th DeepStack feature is added at those rows after
decoder layer i. M-RoPE needs no kernel of its own: each token's cos/sin row is built
from its (t, h, w) position, interleaving the axes' frequencies, and the q/k-norm + RoPE
kernel applies it as any other. ``plan`` builds the 3D positions (``get_rope_index``):
text tokens t = h = w = the running position; an image's token (row, col) starting at
running position s sits at (s, s + row, s + col), and text resumes at s + max(rows, cols).
A shared prefix is text only, so a document's positions continue after it as plain ones.
"""
from dataclasses import dataclass
from types import SimpleNamespace
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.context import BatchContext, build_context
from engine.models.base import EngineModel
from engine.models.layers import (
    LayerNorm,
    Linear,
    RMSNorm,
    VocabEmbedding,
    default_weight_loader,
    head_dim,
    rope_parameters,
    text_config,
)
from engine.models.qwen3 import Qwen3DecoderLayer, Qwen3Model
from engine.prompts.images import pixel_values
from engine.sequence import Seq

IMAGE_TOKEN_ID = 151655  # <|image_pad|>


# --- vision tower ----------------------------------------------------------------------------------

class VisionAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.qkv = Linear(hidden, 3 * hidden, bias=True)  # [q heads | k heads | v heads]
        self.proj = Linear(hidden, hidden, bias=True)

    def forward(self, x, cu_seqlens, max_seqlen: int, cos, sin):
        # x [P, hidden]; one bidirectional sequence per image.
        qkv = self.qkv(x)
        q, k, v = kernels.qk_norm_rope(qkv, None, None, cos, sin, self.num_heads, self.num_heads, self.head_dim, 0.0)
        o = kernels.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, causal=False, scale=self.head_dim ** -0.5,
                                     max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
        return self.proj(o.reshape(x.shape[0], -1))


class VisionBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, intermediate: int):
        super().__init__()
        self.norm1, self.norm2 = LayerNorm(hidden), LayerNorm(hidden)
        self.attn = VisionAttention(hidden, num_heads)
        self.mlp = nn.Module()
        self.mlp.linear_fc1 = Linear(hidden, intermediate, bias=True)
        self.mlp.linear_fc2 = Linear(intermediate, hidden, bias=True)

    def forward(self, x, cu_seqlens, max_seqlen, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen, cos, sin)
        h = F.gelu(self.mlp.linear_fc1(self.norm2(x)), approximate="tanh")
        return x + self.mlp.linear_fc2(h)


class PatchMerger(nn.Module):
    """4 consecutive patches (one 2x2 block) -> one token: LayerNorm before the reshape (merger)
    or after it (DeepStack), Linear, exact GELU, Linear."""

    def __init__(self, hidden: int, out_hidden: int, merge_unit: int, postshuffle_norm: bool):
        super().__init__()
        self.width = hidden * merge_unit
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm(self.width if postshuffle_norm else hidden)
        self.linear_fc1 = Linear(self.width, self.width, bias=True)
        self.linear_fc2 = Linear(self.width, out_hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.width)) if self.postshuffle_norm else self.norm(x).view(-1, self.width)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


def _grid_coords(grids: Sequence[Tuple[int, int, int]], merge: int) -> Tuple[np.ndarray, np.ndarray]:
    """(row, col) of every patch, in merge-block order, images one after another."""
    rows, cols = [], []
    for t, h, w in grids:
        r = np.arange(h).reshape(h // merge, merge, 1, 1)
        c = np.arange(w).reshape(1, 1, w // merge, merge)
        r, c = np.broadcast_arrays(r, c)  # [h/m, m, w/m, m]
        rows.append(np.tile(r.transpose(0, 2, 1, 3).reshape(-1), t))
        cols.append(np.tile(c.transpose(0, 2, 1, 3).reshape(-1), t))
    return np.concatenate(rows), np.concatenate(cols)


class VisionTower(nn.Module):
    def __init__(self, vcfg):
        super().__init__()
        self.hidden, self.merge = vcfg.hidden_size, vcfg.spatial_merge_size
        self.in_channels = getattr(vcfg, "in_channels", 3)
        patch, temporal = vcfg.patch_size, vcfg.temporal_patch_size
        self.num_heads = vcfg.num_heads
        self.head_dim = self.hidden // self.num_heads
        self.rope_theta = float(rope_parameters(vcfg)["rope_theta"])
        if getattr(vcfg, "hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise NotImplementedError(f"vision activation {vcfg.hidden_act!r} is not supported for Qwen3-VL")
        self.patch_embed = nn.Module()  # Conv3d(kernel = stride = [T, p, p]) == a linear map of each row
        self.patch_embed.proj = nn.Module()
        self.patch_embed.proj.weight = nn.Parameter(
            torch.empty(self.hidden, self.in_channels, temporal, patch, patch), requires_grad=False)
        self.patch_embed.proj.bias = nn.Parameter(torch.empty(self.hidden), requires_grad=False)
        for p in (self.patch_embed.proj.weight, self.patch_embed.proj.bias):
            p.weight_loader = default_weight_loader
        self.pos_embed = VocabEmbedding(vcfg.num_position_embeddings, self.hidden)
        self.side = int(round(vcfg.num_position_embeddings ** 0.5))
        self.blocks = nn.ModuleList([VisionBlock(self.hidden, self.num_heads, vcfg.intermediate_size)
                                     for _ in range(vcfg.depth)])
        unit = self.merge ** 2
        self.merger = PatchMerger(self.hidden, vcfg.out_hidden_size, unit, postshuffle_norm=False)
        self.deepstack_indexes = list(getattr(vcfg, "deepstack_visual_indexes", []) or [])
        self.deepstack_merger_list = nn.ModuleList([PatchMerger(self.hidden, vcfg.out_hidden_size, unit, True)
                                                    for _ in self.deepstack_indexes])

    def _pos_embed(self, grids, device) -> torch.Tensor:
        # The learned side x side table resampled bilinearly (align-corners) to each (h, w) grid: [P, hidden].
        n = self.side
        rows, cols = _grid_coords(grids, self.merge)
        sizes_h = np.concatenate([np.full(t * h * w, h) for t, h, w in grids])
        sizes_w = np.concatenate([np.full(t * h * w, w) for t, h, w in grids])
        axes = []
        for pos, size in ((rows, sizes_h), (cols, sizes_w)):
            pos_t = torch.from_numpy(pos).float()
            src = pos_t * (n - 1) / torch.from_numpy(np.maximum(size - 1, 1)).float()
            lo = src.floor()
            frac = src - lo
            lo = lo.long()
            axes.append(((lo, (lo + 1).clamp(max=n - 1)), (1 - frac, frac)))
        (h0, h1), (wh0, wh1) = axes[0]
        (w0, w1), (ww0, ww1) = axes[1]
        idx = torch.stack([h0 * n + w0, h0 * n + w1, h1 * n + w0, h1 * n + w1], dim=1).to(device)
        wts = torch.stack([wh0 * ww0, wh0 * ww1, wh1 * ww0, wh1 * ww1], dim=1).to(device)
        table = self.pos_embed.weight
        return (table[idx].float() * wts[:, :, None]).sum(1).to(table.dtype)  # fp32 weights, as the reference

    def _rotary(self, grids, device):
        # cos/sin [P, head_dim/2] fp32: the row's frequencies, then the column's (rotate-half layout).
        rows, cols = _grid_coords(grids, self.merge)
        spatial = self.head_dim // 2
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
        f = torch.cat([torch.from_numpy(rows).float()[:, None] * inv, torch.from_numpy(cols).float()[:, None] * inv], 1)
        return f.cos().to(device), f.sin().to(device)

    def forward(self, pixel_values: torch.Tensor, grids: List[Tuple[int, int, int]]):
        """pixel_values [P, C*T*p*p] -> (merged [P/4, out], DeepStack features: list of [P/4, out])."""
        proj = self.patch_embed.proj
        x = F.linear(pixel_values.to(proj.weight.dtype), proj.weight.view(self.hidden, -1), proj.bias)
        x = x + self._pos_embed(grids, x.device)
        cos, sin = self._rotary(grids, x.device)
        lens = [h * w for t, h, w in grids for _ in range(t)]
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=x.device)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cu, max(lens), cos, sin)
            if i in self.deepstack_indexes:
                deepstack.append(self.deepstack_merger_list[self.deepstack_indexes.index(i)](x))
        return self.merger(x), deepstack


# --- language model ----------------------------------------------------------------------------------

@dataclass
class VisionBatch:
    """The images of a batch, in token order: what ``plan`` hands ``forward``."""

    pixel_values: torch.Tensor  # [P, 1536]
    grids: List[Tuple[int, int, int]]
    image_rows: torch.Tensor  # [n_image_tokens] int64, rows of ``<|image_pad|>`` tokens in the batch
    positions: torch.Tensor  # [3, T] int64 M-RoPE positions


def mrope_positions(ids: Sequence[int], grids: Sequence[Tuple[int, int, int]], start: int, image_token_id: int,
                    merge: int) -> np.ndarray:
    """[3, len(ids)] (t, h, w) positions of one sequence whose running position starts at ``start``."""
    out = np.empty((3, len(ids)), dtype=np.int64)
    arr = np.asarray(ids)
    pos, i, k = start, 0, 0
    n = len(ids)
    pads = np.flatnonzero(arr == image_token_id)
    while i < n:
        nxt = pads[np.searchsorted(pads, i)] if np.searchsorted(pads, i) < len(pads) else n
        if nxt > i:  # a text run
            out[:, i:nxt] = np.arange(pos, pos + nxt - i)
            pos += nxt - i
            i = nxt
            continue
        if k >= len(grids):
            raise ValueError("more <|image_pad|> runs than images in a sequence")
        t, h, w = grids[k]
        gh, gw = h // merge, w // merge
        cnt = t * gh * gw
        if not (arr[i:i + cnt] == image_token_id).all():
            raise ValueError(f"image {k} needs {cnt} <|image_pad|> tokens in a row")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        out[0, i:i + cnt] = tt.reshape(-1) + pos
        out[1, i:i + cnt] = hh.reshape(-1) + pos
        out[2, i:i + cnt] = ww.reshape(-1) + pos
        pos += max(gh, gw)
        i += cnt
        k += 1
    if k != len(grids):
        raise ValueError(f"a sequence holds {len(grids)} images but {k} <|image_pad|> runs")
    return out


class Qwen3VLModel(EngineModel):
    supports_prefix = True  # text-only prefixes (the query), exact: see the module docstring
    supports_last_only = True
    checkpoint_prefixes = ("model.language_model.", "model.")
    packed_modules_mapping = Qwen3Model.packed_modules_mapping

    def __init__(self, cfg):
        super().__init__()
        tcfg = text_config(cfg)
        vcfg = cfg.vision_config
        vcfg = SimpleNamespace(**vcfg) if isinstance(vcfg, dict) else vcfg
        rope = rope_parameters(tcfg)
        if rope["rope_type"] != "default":
            raise NotImplementedError(f"rope type {rope['rope_type']!r} is not supported for Qwen3-VL")
        if not rope.get("mrope_interleaved", True):
            raise NotImplementedError("Qwen3-VL with non-interleaved M-RoPE is not supported")
        self.hidden_size = tcfg.hidden_size
        self.head_dim = head_dim(tcfg)
        self.rope_theta = float(rope["rope_theta"])
        self.mrope_section = list(rope.get("mrope_section") or [24, 20, 20])
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")
        self.image_token_id = int(getattr(cfg, "image_token_id", IMAGE_TOKEN_ID))
        self.merge = vcfg.spatial_merge_size
        self.embed_tokens = VocabEmbedding(tcfg.vocab_size, tcfg.hidden_size)
        self.layers = nn.ModuleList([Qwen3DecoderLayer(tcfg, i) for i in range(tcfg.num_hidden_layers)])
        self.norm = RMSNorm(tcfg.hidden_size, tcfg.rms_norm_eps)
        self.visual = VisionTower(vcfg)

    def mrope_cos_sin(self, positions: torch.Tensor):
        """cos/sin [T, D/2] fp32 of [3, T] positions: interleaved axes (H at 1, 4, .., W at 2, 5, .., T elsewhere)."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=positions.device).float() / d))
        f = positions.float()[..., None] * inv  # [3, T, D/2]
        out = f[0].clone()
        for axis in (1, 2):
            sl = slice(axis, 3 * self.mrope_section[axis], 3)
            out[:, sl] = f[axis][:, sl]
        return out.cos(), out.sin()

    def plan(self, seqs: List[Seq], device: torch.device, prefixes: Optional[list] = None,
             prefix_index: Optional[List[int]] = None, **extra):
        ids, ctx = build_context([s.token_ids for s in seqs], device, None, prefixes, prefix_index)
        if not any(s.multimodal for s in seqs):
            return ids, ctx  # text only: t = h = w, plain RoPE positions
        starts = [prefixes[j].num_tokens if prefix_index is not None and j >= 0 else 0
                  for j in (prefix_index or [-1] * len(seqs))]
        pos, pixels, grids, rows, off = [], [], [], [], 0
        for s, start in zip(seqs, starts):
            images = list(s.multimodal or [])
            g = [im.grid for im in images]
            pos.append(mrope_positions(s.token_ids, g, start, self.image_token_id, self.merge))
            pixels += [im.patches for im in images]
            grids += g
            rows.append(np.flatnonzero(np.asarray(s.token_ids) == self.image_token_id) + off)
            off += len(s.token_ids)
        # uint8 patches cross to the device; normalized and repeated over the temporal patch there.
        pv = pixel_values(torch.from_numpy(np.concatenate(pixels)).to(device)) if pixels else None
        ctx.multimodal = VisionBatch(pv, grids, torch.from_numpy(np.concatenate(rows)).to(device),
                                     torch.from_numpy(np.concatenate(pos, axis=1)).to(device))
        return ids, ctx

    def forward(self, input_ids: torch.Tensor, ctx: BatchContext) -> Tuple[torch.Tensor, torch.Tensor]:
        # input_ids [T]; returns (last layer output, residual) as Qwen3Model (rows [n] with ctx.last_only).
        x = self.embed_tokens(input_ids)
        vb: Optional[VisionBatch] = ctx.multimodal
        deepstack: list = []
        if vb is not None:
            cos, sin = self.mrope_cos_sin(vb.positions)
            if vb.pixel_values is not None:
                feats, deepstack = self.visual(vb.pixel_values, vb.grids)
                if feats.shape[0] != vb.image_rows.shape[0]:
                    raise ValueError(f"{vb.image_rows.shape[0]} image tokens for {feats.shape[0]} image features")
                x = x.index_copy(0, vb.image_rows, feats.to(x.dtype))
        else:
            cos, sin = kernels.rope_cos_sin(ctx.positions, self.head_dim, self.rope_theta)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, ctx, cos, sin)
            if i < len(deepstack):
                x = self._add_deepstack(x, deepstack[i], vb.image_rows, ctx, input_ids.shape[0])
        return x, residual

    @staticmethod
    def _add_deepstack(x, feat, image_rows, ctx: BatchContext, n_tokens: int):
        if x.shape[0] == n_tokens:
            return x.index_add(0, image_rows, feat.to(x.dtype))
        # A last-token-only layer: only the last rows remain; add where a last row is an image token.
        where = torch.full((n_tokens,), -1, dtype=torch.int64, device=x.device)
        where[image_rows] = torch.arange(image_rows.shape[0], device=x.device)
        src = where[ctx.last_index]
        hit = torch.nonzero(src >= 0).squeeze(1)
        return x.index_add(0, hit, feat[src[hit]].to(x.dtype)) if hit.numel() else x
