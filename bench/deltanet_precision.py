#!/usr/bin/env python
"""Expected GPU error of the Triton delta-rule kernels' dot precisions, emulated on a CPU.

The chunked gated delta rule runs its ``tl.dot`` products on fp32 operands. On a
GPU, ``input_precision="tf32"`` rounds both operands to TF32 (10 explicit mantissa
bits) before an fp32-accumulated product; "tf32x3" splits each operand into two
TF32 parts and is as accurate as fp32 for this purpose; "ieee" is fp32 on the FMA
units. Triton's interpreter computes every dot in fp32, so the kernel tests cannot
see the difference. This script replays the kernels' algorithm (the same products,
in the same order: prepare = kk, w, u, attn; scan = v_new = u - w S,
o = (q e^G) S + attn v_new, S' = e^g S + k_dec^T v_new) with each product's
operands rounded as the GPU would, and compares with the same algorithm in fp64.
The triangular solve runs blocked as the prepare kernel does (16 x 16 diagonal blocks by
forward substitution, merged with fp32 products) or row by row (the kernel before), and w,
u and A can be stored in fp16 / bf16 between the kernels, to size the intermediates.

    python bench/deltanet_precision.py                 # Qwen3.5 head dims, 4 x 1,024 tokens
    python bench/deltanet_precision.py --tokens 4096 --seqs 1
"""
import argparse

import torch


def tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 (round to nearest even on the 13 dropped mantissa bits), returned as fp32."""
    i = x.contiguous().view(torch.int32)
    lsb = (i >> 13) & 1
    i = (i + 0x0FFF + lsb) & ~0x1FFF
    return i.view(torch.float32)


def dot(a, b, prec: str):
    if prec == "tf32":
        a, b = tf32(a), tf32(b)
    return a @ b


def solve_rows(lower, dtype):
    """(I + L)^-1 by forward substitution over all C rows (the kernel before the blocked solve)."""
    H, C, _ = lower.shape
    tinv = torch.eye(C, dtype=dtype).repeat(H, 1, 1)
    for i in range(1, C):
        tinv[:, i] = tinv[:, i] - (lower[:, i, :, None] * tinv).sum(1)
    return tinv


def solve_blocked(lower, dtype):
    """The kernel's blocked solve: each 16 x 16 diagonal block by forward substitution, then
    T_ij = -T_ii sum_{j<=m<i} L_im T_mj with fp32 ("ieee") 16 x 16 products."""
    H, C, _ = lower.shape
    nb = C // 16
    blk = [[lower[:, 16 * i:16 * i + 16, 16 * j:16 * j + 16] for j in range(nb)] for i in range(nb)]
    t = [[None] * nb for _ in range(nb)]
    for i in range(nb):
        t[i][i] = solve_rows(blk[i][i], dtype)
    for i in range(nb):
        for j in range(i - 1, -1, -1):
            acc = sum(blk[i][m] @ t[m][j] for m in range(j, i))
            t[i][j] = -(t[i][i] @ acc)
    out = torch.zeros(H, C, C, dtype=dtype)
    for i in range(nb):
        for j in range(i + 1):
            out[:, 16 * i:16 * i + 16, 16 * j:16 * j + 16] = t[i][j]
    return out


def store(x, dtype):
    """An intermediate written to memory in ``dtype`` and read back as fp32 (None: kept in fp32)."""
    return x if dtype is None else x.to(dtype).to(x.dtype)


def chunked(q, k, v, g, beta, chunk: int, prec_state: str, prec_out: str, dtype, solve="blocked", inter=None):
    """One sequence, all heads (q, k already L2-normalised and q scaled): (o [T, H, Dv], S [H, Dk, Dv]).
    ``solve``: "rows" or "blocked"; ``inter``: the storage dtype of w, u and A, or a tuple of the three (None: fp32)."""
    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    T, H, dk = k.shape
    dv = v.shape[-1]
    S = torch.zeros(H, dk, dv, dtype=dtype)
    out = torch.empty(T, H, dv, dtype=dtype)
    for c0 in range(0, T, chunk):
        sl = slice(c0, min(c0 + chunk, T))
        qc, kc, vc = q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1)  # [H, C, D]
        gc, bc = g[sl].T, beta[sl].T  # [H, C]
        G = gc.cumsum(-1)
        C = qc.shape[1]
        causal = torch.ones(C, C, dtype=torch.bool).tril()
        decay = torch.where(causal, (G[:, :, None] - G[:, None, :]).clamp(max=0).exp(), 0.0)
        kk = dot(kc, kc.transpose(1, 2), prec_state)
        lower = torch.where(causal.tril(-1), kk * decay * bc[:, :, None], 0.0)
        if solve == "blocked" and C % 16 == 0:
            tinv = solve_blocked(lower, dtype)
        else:  # forward substitution in plain arithmetic, row by row
            tinv = solve_rows(lower, dtype)
        w_dt, u_dt, a_dt = inter if isinstance(inter, tuple) else (inter,) * 3
        w = store(dot(tinv, kc * (bc * G.exp())[..., None], prec_state), w_dt)
        u = store(dot(tinv, vc * bc[..., None], prec_state), u_dt)
        attn = store(dot(qc, kc.transpose(1, 2), prec_out) * decay, a_dt)
        v_new = u - dot(w, S, prec_state)
        o = dot(qc * G.exp()[..., None], S, prec_out) + dot(attn, v_new, prec_out)
        out[sl] = o.transpose(0, 1)
        g_last = G[:, -1:]
        k_dec = kc * (g_last - G).exp()[..., None]
        S = S * g_last.exp()[..., None] + dot(k_dec.transpose(1, 2), v_new, prec_state)
    return out, S


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dk", type=int, default=128)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    # (state products, output products, solve, storage of w / u / A)
    variants = {"all ieee (fp32)": ("ieee", "ieee", "blocked", None),
                "all tf32, row-by-row solve (before)": ("tf32", "tf32", "rows", None),
                "all tf32, blocked solve, fp32 w/u/A (the kernels)": ("tf32", "tf32", "blocked", None),
                "all tf32, blocked solve, fp16 w/u/A": ("tf32", "tf32", "blocked", torch.float16),
                "all tf32, blocked solve, bf16 w/u/A": ("tf32", "tf32", "blocked", torch.bfloat16),
                "all tf32, blocked solve, fp16 w/A, fp32 u": ("tf32", "tf32", "blocked",
                                                             (torch.float16, None, torch.float16)),
                "all tf32, blocked solve, fp16 w/A, bf16 u": ("tf32", "tf32", "blocked",
                                                             (torch.float16, torch.bfloat16, torch.float16)),
                "state ieee/tf32x3, output tf32": ("ieee", "tf32", "blocked", None)}
    worst = {name: [0.0, 0.0] for name in variants}
    for _ in range(args.seqs):
        T, H = args.tokens, args.heads
        q = torch.nn.functional.normalize(torch.randn(T, H, args.dk), dim=-1) * args.dk ** -0.5
        k = torch.nn.functional.normalize(torch.randn(T, H, args.dk), dim=-1)
        v = torch.randn(T, H, args.dv)
        # Qwen3.5's decay: g = -exp(A_log) * softplus(a + dt_bias), mostly in (-2, 0); beta = sigmoid(b)
        g = -torch.nn.functional.softplus(torch.randn(T, H) - 2.0) * torch.rand(H).add(0.5)
        beta = torch.sigmoid(torch.randn(T, H))
        ref_o, ref_s = chunked(q, k, v, g, beta, args.chunk, "ieee", "ieee", torch.float64, "rows")
        for name, (ps, po, solve, inter) in variants.items():
            o, s = chunked(q, k, v, g, beta, args.chunk, ps, po, torch.float32, solve, inter)
            worst[name][0] = max(worst[name][0], ((o.double() - ref_o).abs().max() / ref_o.abs().max()).item())
            worst[name][1] = max(worst[name][1], ((s.double() - ref_s).abs().max() / ref_s.abs().max()).item())
    print(f"{args.seqs} sequences x {args.tokens} tokens, {args.heads} heads, Dk {args.dk}, Dv {args.dv}, "
          f"chunk {args.chunk}; error = max |x - x_fp64| / max |x_fp64|")
    print(f"| dot precisions | output | final state |\n|---|---|---|")
    for name, (eo, es) in worst.items():
        print(f"| {name} | {eo:.2e} | {es:.2e} |")
    print("bf16 output rounding, for scale: 3.9e-03 (half an ulp at 1.0 is 2^-9 = 2.0e-03)")


if __name__ == "__main__":
    main()
