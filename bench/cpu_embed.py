"""CPU embedding: the bundled all-MiniLM-L6-v2, ours vs sentence-transformers vs ONNX Runtime, same run.

All three embed the same 1,000 texts of 20-80 words with the same tokenizer
(the folder's tokenizer.json, truncated at the model's max_seq_length), mean
pooling and L2 normalisation. ONNX Runtime runs the same folder exported here
with ``torch.onnx.export`` (transformers' BertModel, dynamic batch and length),
with 2 intra-op threads, length-sorted batches of 32 as sentence-transformers
batches. Prints throughput over the 1,000 texts (best of --rounds) and p50/p99
of one call with 1 and 10 texts, each with its ratio to ours, and the min cosine
to ours; and each path's achieved rate over the 1,000 texts (the encoder's linear and
attention FLOPs at the texts' token counts, GFLOP/s, or GOP/s for int8) against this
machine's peak for that precision (the best rate of one large oneDNN GEMM at the same
thread count, common.gemm_peak). The paths take turns (round by round, in blocks of calls), so on a shared,
noisy machine they see the same load and their ratios stay meaningful. Each path
is timed where it runs; ours runs in this process, every other path in a process
of its own (see ProcessPath: two torch paths in one process slow each other).

    pip install -e ".[bench]"
    python bench/cpu_embed.py                       # fp32
    python bench/cpu_embed.py --dtype bfloat16      # our bf16 (the peers stay fp32)
    python bench/cpu_embed.py --quantize int8 --only ours,fp32,ort,ort-int8   # our int8 against ONNX Runtime's
"""
import argparse
import json
import os
import random
import tempfile
import time

import numpy as np
import torch

import common  # noqa: F401 (the repository on sys.path)
from checkpoints import words
from common import encoder_flops, gemm_peak

BATCH = 32  # sentence-transformers' default batch size; ONNX Runtime gets the same batches


def interleaved_latency(paths, texts, reps, block=10):
    """p50/p99 ms of one call on ``texts`` per path, the paths taking turns in blocks of ``block`` calls.

    Blocks, with a pause between them, rather than single calls: each path's thread pool
    (OpenMP teams, ONNX Runtime's pool) spins for a while after its work, and would take
    the cores from the next path's call.
    """
    times = {name: [] for name in paths}
    for start in range(0, reps, block):
        for name, path in paths.items():
            time.sleep(0.2)
            times[name] += path.latencies(texts, min(block, reps - start))
    out = {}
    for name, ts in times.items():
        ts = sorted(t * 1e3 for t in ts)
        out[name] = (ts[len(ts) // 2], ts[min(len(ts) - 1, int(0.99 * len(ts)))])
    return out


def interleaved_throughput(paths, texts, rounds):
    """Texts/s per path over all ``texts``: the best of ``rounds`` rounds, the paths taking turns."""
    best, embs = {name: 0.0 for name in paths}, {}
    for path in paths.values():
        path.run(texts[:BATCH])  # warm-up
    for _ in range(rounds):
        for name, path in paths.items():
            time.sleep(0.2)  # let the previous path's pool stop spinning
            emb, seconds = path.run(texts)
            embs[name] = np.asarray(emb, dtype=np.float32)
            best[name] = max(best[name], len(texts) / seconds)
    return best, embs


def make_embed(kind, folder, options):
    """The embedding function of one path: ours (``options``: Embedder kwargs), st or ort."""
    if kind == "ours":
        from engine import Embedder

        return Embedder(**options).embed
    if kind == "st":
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(folder, device="cpu")
        return lambda t: st.encode(t, batch_size=BATCH, normalize_embeddings=True)
    return OnnxEmbedder(folder, 256, options["threads"], options.get("int8", False)).embed


class Path:
    """A path timed where it runs: ``run(texts) -> (embeddings, seconds)``, ``latencies(texts, n)``."""

    def __init__(self, fn):
        self.fn = fn

    def run(self, texts):
        t0 = time.perf_counter()
        emb = self.fn(texts)
        return emb, time.perf_counter() - t0

    def latencies(self, texts, n):
        self.fn(texts)  # warm this path's pool again
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.fn(texts)
            out.append(time.perf_counter() - t0)
        return out


def _serve(conn, kind, folder, options):
    path = Path(make_embed(kind, folder, options))
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(getattr(path, msg[0])(*msg[1:]))


class ProcessPath:
    """A path in a process of its own. Every torch path owns its process: each thread that runs
    parallel torch ops gets its own OpenMP team, and with more OpenMP threads than cores libgomp
    stops spinning between parallel regions, which would slow every torch path of a shared process
    (a one-text forward by about 25% on 2 cores). Users run one of these paths, not three."""

    def __init__(self, kind, folder, options):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, kind, folder, options), daemon=True)
        self.proc.start()
        if self.conn.recv() != "ready":
            raise RuntimeError(f"{kind} path failed to start")

    def run(self, texts):
        self.conn.send(("run", texts))
        return self.conn.recv()

    def latencies(self, texts, n):
        self.conn.send(("latencies", texts, n))
        return self.conn.recv()

    def close(self):
        self.conn.send(None)
        self.proc.join(30)


class OnnxEmbedder:
    """ONNX Runtime on the exported BertModel, with the folder's tokenizer, mean pooling and L2 norm.
    ``int8``: the model through ONNX Runtime's own dynamic int8 (``quantize_dynamic``, per channel)."""

    def __init__(self, folder, max_length, threads, int8=False):
        import onnxruntime as ort
        from tokenizers import Tokenizer
        from transformers import AutoModel

        self.tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.tok.enable_truncation(max_length)
        self.tok.no_padding()
        model = AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
        path = os.path.join(tempfile.mkdtemp(prefix="onnx-"), "model.onnx")

        class Wrapped(torch.nn.Module):  # positional inputs for the exporter
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.m(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

        ids = torch.ones(2, 16, dtype=torch.long)
        with torch.inference_mode():
            torch.onnx.export(
                Wrapped(model), (ids, torch.ones_like(ids), torch.zeros_like(ids)), path, dynamo=False,
                input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["last_hidden_state"],
                dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "token_type_ids",
                                                                   "last_hidden_state")},
                opset_version=17)
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            qpath = path[:-len(".onnx")] + ".int8.onnx"
            quantize_dynamic(path, qpath, per_channel=True, weight_type=QuantType.QInt8)
            path = qpath
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def _batch(self, encs):
        n, L = len(encs), max(len(e.ids) for e in encs)
        ids = np.zeros((n, L), np.int64)
        mask = np.zeros((n, L), np.int64)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        h = self.sess.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
        m = mask[..., None].astype(np.float32)
        pooled = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def embed(self, texts):
        encs = self.tok.encode_batch(list(texts), add_special_tokens=True)
        order = sorted(range(len(texts)), key=lambda i: -len(encs[i].ids))
        out = np.empty((len(texts), self.sess.get_outputs()[0].shape[-1] or 384), np.float32)
        for s in range(0, len(order), BATCH):
            idx = order[s : s + BATCH]
            out[idx] = self._batch([encs[i] for i in idx])
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=100, help="latency calls per config")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quantize", default=None, choices=[None, "int8"])
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=2, help="throughput rounds (best kept)")
    ap.add_argument("--only", default="ours,fp32,st,ort",
                    help="comma list of ours, fp32 (our fp32 beside a bf16/int8 run), st, ort, ort-int8 (ONNX "
                         "Runtime's dynamic int8)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    only = set(args.only.split(","))

    from engine.default_model import default_model_path

    folder = str(default_model_path())
    rng = random.Random(0)
    texts = [words(rng, rng.randint(20, 80)) for _ in range(args.texts)]
    one, ten = texts[:1], texts[1:11]
    print(f"machine: CPU ({os.cpu_count()} cores), torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"{len(texts)} texts of 20-80 words; ours: dtype {args.dtype}, quantize {args.quantize}")

    paths = {}
    if "ours" in only:  # ours in this process: nothing else here runs torch
        kw = dict(dtype=args.dtype)
        if args.quantize:
            kw["quantize"] = args.quantize
        paths["ours"] = Path(make_embed("ours", folder, kw))
    if "fp32" in only and (args.dtype != "float32" or args.quantize):  # our fp32 beside the mode, for drift
        paths["ours fp32"] = ProcessPath("ours", folder, {})
    if "st" in only:
        paths["sentence-transformers"] = ProcessPath("st", folder, {})
    if "ort" in only:
        paths[f"onnxruntime ({args.threads} threads)"] = ProcessPath("ort", folder, {"threads": args.threads})
    if "ort-int8" in only:
        paths[f"onnxruntime int8 ({args.threads} thr)"] = ProcessPath("ort", folder, {"threads": args.threads,
                                                                                     "int8": True})

    tps, embs = interleaved_throughput(paths, texts, args.rounds)
    print("  throughput done:", {k: round(v, 1) for k, v in tps.items()}, flush=True)
    lat1 = interleaved_latency(paths, one, args.reps)
    lat10 = interleaved_latency(paths, ten, max(10, args.reps // 4))
    for path in paths.values():
        if isinstance(path, ProcessPath):
            path.close()
    rows = {name: dict(texts_per_s=tps[name], p50_1=lat1[name][0], p99_1=lat1[name][1], p50_10=lat10[name][0],
                       p99_10=lat10[name][1]) for name in paths}

    # achieved rates: the FLOPs of the 1,000 texts at their token counts (truncated as every path truncates)
    from tokenizers import Tokenizer

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tok.enable_truncation(256)
    tok.no_padding()
    gflop = encoder_flops(config, [len(e.ids) for e in tok.encode_batch(texts)]) / 1e9
    ours_precision = "int8" if args.quantize else args.dtype
    peaks = {p: gemm_peak(p) for p in {ours_precision, "float32"} | ({"int8"} if "ort-int8" in only else set())}
    print(f"  {gflop:.0f} GFLOP over the {len(texts)} texts; GEMM peak at {torch.get_num_threads()} thread(s): "
          + ", ".join(f"{p} {v:.0f}" for p, v in peaks.items() if v), flush=True)

    def precision(name):
        return ours_precision if name == "ours" else "int8" if "int8" in name else "float32"

    ref = embs.get("ours")
    print(f"{'path':28s} {'texts/s':>9s} {'ours/x':>7s} {'p50 1':>8s} {'p99 1':>8s} {'x/ours':>7s} "
          f"{'p50 10':>8s} {'p99 10':>8s} {'x/ours':>7s} {'GFLOP/s':>8s} {'of peak':>8s} {'min cos to ours':>16s}")
    for name, r in rows.items():
        o = rows.get("ours", r)
        cos = float((embs[name] * ref).sum(1).min()) if ref is not None else float("nan")
        r["min_cos_to_ours"] = cos
        r["gflop_per_s"] = gflop * r["texts_per_s"] / len(texts)
        peak = peaks.get(precision(name))
        r["of_peak"] = r["gflop_per_s"] / peak if peak else float("nan")
        print(f"{name:28s} {r['texts_per_s']:9.1f} {o['texts_per_s'] / r['texts_per_s']:7.2f} "
              f"{r['p50_1']:7.2f}ms {r['p99_1']:7.2f}ms {r['p50_1'] / o['p50_1']:7.2f} "
              f"{r['p50_10']:7.2f}ms {r['p99_10']:7.2f}ms {r['p50_10'] / o['p50_10']:7.2f} "
              f"{r['gflop_per_s']:8.1f} {100 * r['of_peak']:7.1f}% {cos:16.6f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows, gflop=gflop, peaks=peaks), f, indent=2)


if __name__ == "__main__":
    main()
