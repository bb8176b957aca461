"""int8 FFN down-projections: the accuracy of candidate schemes, simulated in torch.

The six down-projections of the bundled MiniLM are swapped for fake-quantized versions (weights fp32,
round-to-nearest int8, GPTQ or two-term int8; activations fp32, int8 per row or two-pass residual int8;
optionally the top-k calibration channels kept in fp32), every other linear is the engine's int8, and the
min / mean cosine to our fp32 over bench/cpu_embed.py's texts is printed. Accuracy only: nothing here is timed.

    NT=1000 OMP_NUM_THREADS=1 python bench/int8_down_accuracy.py     # V=<substring> filters the variants
"""
import os
import random
import time

import torch

import common  # noqa: F401 (the repository on sys.path)
import engine.core.runner as runner
from checkpoints import words
from engine import Embedder
from engine.models import cpu_linear
from kernels.int8_linear import quantize_rows_ref

torch.set_num_threads(1)

N = int(os.environ.get("NT", "1000"))
rng = random.Random(0)
texts = [words(rng, rng.randint(20, 80)) for _ in range(N)]
ref = Embedder().embed(texts)

CAP = {}
real_cal = runner.calibrate


def cal(model, seqs, device):
    hooks = []
    for p, n, c in cpu_linear._linears(model):
        if cpu_linear.is_ffn_down(n, c) or n == "dense" and type(p).__name__.endswith("Output"):

            def h(mod, args, out):
                CAP.setdefault(mod, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())

            hooks.append(c.register_forward_hook(h))
    r = real_cal(model, seqs, device)
    for h in hooks:
        h.remove()
    return r


runner.calibrate = cal
emb = Embedder(quantize="int8")
layers = emb.engine.model.encoder["layer"]
# map the captured linears (fp32 Linear) in order of layers
caps = list(CAP.items())
print("captured", len(caps), [x[0].shape for _, x in caps][:2], flush=True)
orig = [layer.output.dense for layer in layers]


def gptq(W, H, scale, damp=0.01, block=128, actorder=True):
    W = W.double().clone()
    H = H.double().clone()
    K = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if actorder else torch.arange(K)
    W = W[:, perm]
    H = H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Q = torch.zeros_like(W)
    s = scale.double()[:, None]
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hi = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hi[i, i]
            q = torch.clamp(torch.round(w[:, None] / s), -127, 127)[:, 0]
            Q[:, i1 + i] = q
            e = (w - q * s[:, 0]) / d
            W1[:, i:] -= e[:, None] * Hi[i, i:][None, :]
            E1[:, i] = e
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return Q[:, inv]


class Fake(torch.nn.Module):
    def __init__(self, lin, X, wmode, amode, k=0, alpha=None, damp=0.01):
        super().__init__()
        W = lin.weight.detach().float()
        self.b = lin.bias.detach().float()
        amax = X.abs().amax(0)
        self.smooth = None
        if alpha is not None:
            self.smooth = cpu_linear.smooth_factors(W, amax, alpha)
            W = W * self.smooth
        self.idx = None
        if k:
            self.idx = torch.argsort(amax, descending=True)[:k]
            mask = torch.ones(W.shape[1], dtype=torch.bool)
            mask[self.idx] = False
            self.rest = mask.nonzero()[:, 0]
            self.Wf = W[:, self.idx].clone()
            W = W[:, self.rest]
            X = X[:, self.rest]
        Xs = X if self.smooth is None else X / (self.smooth if k == 0 else self.smooth[self.rest])
        if wmode == "float":
            self.Wd = W
        else:
            sc = (W.abs().amax(1) / 127).clamp_min(1e-12)
            if wmode in ("rtn", "wres"):
                q = torch.clamp(torch.round(W / sc[:, None]), -127, 127)
                if wmode == "wres":  # a second int8 term for the rounding error, its own scales
                    r = W - q * sc[:, None]
                    s2 = (r.abs().amax(1) / 127).clamp_min(1e-12)
                    q = (
                        q.double()
                        + (torch.clamp(torch.round(r / s2[:, None]), -127, 127) * s2[:, None]).double()
                        / sc[:, None].double()
                    )
            else:
                H = Xs.double().T @ Xs.double()
                q = gptq(W, H, sc, damp)
            self.Wd = (q * sc[:, None].double()).float()
        self.amode = amode

    def forward(self, x):
        shp = x.shape
        x = x.reshape(-1, shp[-1]).float()
        yf = 0
        if self.idx is not None:
            yf = x[:, self.idx] @ self.Wf.T
            x = x[:, self.rest]
        if self.smooth is not None:
            x = x / (self.smooth if self.idx is None else self.smooth[self.rest])
        if self.amode == "float":
            xd = x
        else:
            q, s, z = quantize_rows_ref(x, None)
            xd = (q.float() - z[:, None].float()) * s[:, None]
            if self.amode == "resid":
                q2, s2, z2 = quantize_rows_ref(x - xd, None)
                xd = xd + (q2.float() - z2[:, None].float()) * s2[:, None]
        y = xd @ self.Wd.T + yf + self.b
        return y.view(*shp[:-1], -1)


def run(name, **kw):
    t = time.time()
    for li, layer in enumerate(layers):
        lin, xs = caps[li]
        layer.output.dense = Fake(lin, torch.cat(xs), **kw)
    tp = time.time() - t
    out = emb.embed(texts)
    cos = (out * ref).sum(1)
    print(f"{name:40s} min cos {cos.min():.6f} mean {cos.mean():.6f} prep {tp:.2f}s", flush=True)


for layer, o in zip(layers, orig):
    layer.output.dense = o
out = emb.embed(texts)
print(f"{'current (downs fp32)':40s} min cos {(out * ref).sum(1).min():.6f}", flush=True)
V = os.environ.get("V", "all")
cfgs = [
    ("w float a float", dict(wmode="float", amode="float")),
    ("w rtn a float", dict(wmode="rtn", amode="float")),
    ("w float a int8", dict(wmode="float", amode="int8")),
    ("w rtn a int8", dict(wmode="rtn", amode="int8")),
    ("w gptq a float", dict(wmode="gptq", amode="float")),
    ("w gptq a int8", dict(wmode="gptq", amode="int8")),
    ("w gptq a resid", dict(wmode="gptq", amode="resid")),
    ("w rtn a resid", dict(wmode="rtn", amode="resid")),
    ("w gptq a int8 k16", dict(wmode="gptq", amode="int8", k=16)),
    ("w gptq a int8 k64", dict(wmode="gptq", amode="int8", k=64)),
    ("w rtn a int8 k16", dict(wmode="rtn", amode="int8", k=16)),
    ("w wres a int8", dict(wmode="wres", amode="int8")),
    ("w wres a int8 k16", dict(wmode="wres", amode="int8", k=16)),
    ("w wres a resid", dict(wmode="wres", amode="resid")),
    ("w gptq a int8 damp0.1", dict(wmode="gptq", amode="int8", damp=0.1)),
]
for name, kw in cfgs:
    if V == "all" or any(v in name for v in V.split(";")):
        run(name, **kw)
