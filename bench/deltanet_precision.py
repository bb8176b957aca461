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


def chunked(q, k, v, g, beta, chunk: int, prec_state: str, prec_out: str, dtype):
    """One sequence, all heads (q, k already L2-normalised and q scaled): (o [T, H, Dv], S [H, Dk, Dv])."""
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
        tinv = torch.eye(C, dtype=dtype).repeat(H, 1, 1)
        for i in range(1, C):  # forward substitution in plain arithmetic, as the kernel does
            tinv[:, i] = tinv[:, i] - (lower[:, i, :, None] * tinv).sum(1)
        w = dot(tinv, kc * (bc * G.exp())[..., None], prec_state)
        u = dot(tinv, vc * bc[..., None], prec_state)
        attn = dot(qc, kc.transpose(1, 2), prec_out) * decay
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
    variants = {"all ieee (fp32)": ("ieee", "ieee"), "all tf32": ("tf32", "tf32"),
                "state ieee/tf32x3, output tf32": ("ieee", "tf32")}
    worst = {name: [0.0, 0.0] for name in variants}
    for _ in range(args.seqs):
        T, H = args.tokens, args.heads
        q = torch.nn.functional.normalize(torch.randn(T, H, args.dk), dim=-1) * args.dk ** -0.5
        k = torch.nn.functional.normalize(torch.randn(T, H, args.dk), dim=-1)
        v = torch.randn(T, H, args.dv)
        # Qwen3.5's decay: g = -exp(A_log) * softplus(a + dt_bias), mostly in (-2, 0); beta = sigmoid(b)
        g = -torch.nn.functional.softplus(torch.randn(T, H) - 2.0) * torch.rand(H).add(0.5)
        beta = torch.sigmoid(torch.randn(T, H))
        ref_o, ref_s = chunked(q, k, v, g, beta, args.chunk, "ieee", "ieee", torch.float64)
        for name, (ps, po) in variants.items():
            o, s = chunked(q, k, v, g, beta, args.chunk, ps, po, torch.float32)
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
