"""KaLM-Reranker-V1 end to end: cold (encoder + decoder) vs warm passage cache vs transformers, same process.

Workload "rerank-1k" on the Nano shape (KaLM-Reranker-V1-Nano: hidden 640, 18+18
layers, 4/1 heads of 256, 5 sliding (window 512) : 1 full, vocabulary 262,144) with
random weights: 1 query, documents of 64-448 tokens, r = 4. Our engine runs each cache
mode ("states": pooled encoder states; "kv": every decoder layer's cross K/V):
  cold  - a fresh cache: encoder, pooling and decoder in one call;
  warm  - the same documents with another query: decoder only.
The transformers reference runs the KaLM recipe (encoder -> masked mean over groups of r
-> decoder with encoder_outputs, last position's logits), in batches, cold as always.

    python bench/e2e_kalm.py                   # CPU default: 24 documents, 6+6 layers
    python bench/e2e_kalm.py --docs 1024 --layers 18   # the GPU default
    python bench/e2e_kalm.py --store --docs 100       # from an on-disk passage store

Store mode (``--store``): the documents are indexed into a passage store (engine/core/store.py;
index throughput in passages/s), then a fresh engine opened on the store ranks them by id:
  store cold - every passage read from disk into the pool (no encoder work);
  store warm - the same ids with another query: served from the pool in front of the store;
against cold encoding of the same texts by an engine without a store.
"""
import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

from checkpoints import build_kalm, words
from common import machine, sync, timed

NANO = dict(hidden=640, heads=4, kv_heads=1, head_dim=256, intermediate=2048, sliding_window=512,
            query_pre_attn_scalar=256, vocab_size=262_144, full_every=6)


def make_workload(n_docs: int, rng: random.Random):
    # The KaLM bench tokenizer gives one token per word: 64-448 words are 64-448 tokens.
    docs = [words(rng, rng.randint(64, 448)) for _ in range(n_docs)]
    return words(rng, 20), words(rng, 20), docs


def reference_scores(model, tok, query, docs, ratio, batch_size, device):
    """KaLM recipe in stock transformers: batched, right-padded encoder; the identical prompt needs no padding."""
    from transformers.modeling_outputs import BaseModelOutput

    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    prompt = (f"<bos><start_of_turn>user\nJudge whether the Document meets the requirements based on the Query and "
              f"the Instruct provided. Note that the answer can only be \"yes\" or \"no\".\n\n<Instruct>: Given a query, "
              f"retrieve documents that answer the query.\n<Query>: {query}<end_of_turn>\n<start_of_turn>model\n\n\n\n")
    dec = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]], device=device)
    out = []
    with torch.inference_mode():
        for s in range(0, len(docs), batch_size):
            ids = tok([f"<Document>: {d}" for d in docs[s : s + batch_size]], add_special_tokens=False,
                      truncation=True, max_length=1024)["input_ids"]
            width = -(-max(map(len, ids)) // ratio) * ratio
            enc = torch.tensor([x + [0] * (width - len(x)) for x in ids], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
            h = model.get_encoder()(input_ids=enc, attention_mask=mask).last_hidden_state
            m = mask.view(len(ids), -1, ratio).to(h.dtype)
            pooled = (h.view(len(ids), -1, ratio, h.shape[-1]) * m[..., None]).sum(2) / m.sum(2).clamp(min=1)[..., None]
            logits = model(attention_mask=(m.sum(2) > 0).long(), encoder_outputs=BaseModelOutput(last_hidden_state=pooled),
                           decoder_input_ids=dec.expand(len(ids), -1), logits_to_keep=1).logits[:, -1].float()
            out += torch.sigmoid(logits[:, yes] - logits[:, no]).tolist()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    ap.add_argument("--docs", type=int, default=1024 if gpu else 24)
    ap.add_argument("--layers", type=int, default=18 if gpu else 6, help="encoder and decoder layers each")
    ap.add_argument("--ratio", type=int, default=4)
    ap.add_argument("--modes", nargs="*", default=["states", "kv"], choices=["states", "kv"])
    ap.add_argument("--cache-gib", type=float, default=4.0, help="passage cache budget")
    ap.add_argument("--repeat", type=int, default=2, help="warm runs per mode (best is reported)")
    ap.add_argument("--ref-batch", type=int, default=None, help="transformers batch size (default 8 CPU, 32 GPU)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadiest on a busy machine)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--store", action="store_true", help="store mode: index, then rank by id from the store")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from engine import Reranker

    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    rng = random.Random(0)
    query, query2, docs = make_workload(args.docs, rng)
    folder = Path(tempfile.mkdtemp(prefix="bench-")) / "KaLM-Reranker-V1-Nano-shape"
    ref_model = build_kalm(folder, layers=args.layers, init=0.02, dtype=dtype, **NANO)
    tok = AutoTokenizer.from_pretrained(str(folder))
    n_tok = sum(len(x) for x in tok([f"<Document>: {d}" for d in docs], add_special_tokens=False)["input_ids"])
    print(f"machine: {machine()}  Nano shape, {args.layers}+{args.layers} layers  pairs: {len(docs)}  "
          f"passage tokens: {n_tok}  r={args.ratio}  dtype: {dtype}")

    results = {"machine": machine(), "layers": args.layers, "pairs": len(docs), "ratio": args.ratio, "ours": {}}
    if args.store:
        results["store"] = store_mode(args, folder, query, query2, docs, device, dtype, rng)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2, default=str)
        return
    budget = int(args.cache_gib * (1 << 30))
    engines = {m: Reranker(str(folder), device=device, dtype=dtype, cache_cross_kv=m == "kv", passage_cache_bytes=budget)
               for m in args.modes}
    ours = None
    for mode, rr in engines.items():
        rr.rank(words(rng, 5), [words(rng, 70)] * 2, compression_ratio=args.ratio)  # warm-up (kernels, allocator)
        rr.engine.passage_cache.clear()
        st = {}
        cold, t_cold = timed(lambda: rr.rank(query, docs, compression_ratio=args.ratio, stats=st), device)
        cache = rr.cache_stats()
        results["ours"][mode] = {"cold_pairs_per_s": len(docs) / t_cold, "cold_s": t_cold, "cold_stats": st,
                                 "cache_bytes": cache["passage_cache_bytes"],
                                 "bytes_per_passage": cache["passage_cache_bytes"] / max(1, cache["passage_cache_entries"]),
                                 "warm_s": []}
        ours = {r["index"]: r["score"] for r in cold}
    # Warm runs alternate between the modes (best of --repeat), so a busy machine hurts both alike.
    for _ in range(args.repeat):
        for mode, rr in engines.items():
            st = {}
            _, t = timed(lambda: rr.rank(query2, docs, compression_ratio=args.ratio, stats=st), device)
            assert st["passages_encoded"] == 0, st
            results["ours"][mode]["warm_s"].append(t)
    for mode, row in results["ours"].items():
        t_warm = min(row["warm_s"])
        row.update(warm_pairs_per_s=len(docs) / t_warm, warm_over_cold=row["cold_s"] / t_warm)
        print(f"ours [{mode:6s}] cold {row['cold_pairs_per_s']:9.1f} pairs/s ({row['cold_s']:.2f} s, encode "
              f"{row['cold_stats']['encode_s']:.2f} s)  warm {row['warm_pairs_per_s']:9.1f} pairs/s ({t_warm:.2f} s)  "
              f"warm/cold {row['warm_over_cold']:.2f}x  cache {row['cache_bytes'] / 2**20:.1f} MiB "
              f"({row['bytes_per_passage'] / 1024:.0f} KiB/passage)")
    del engines
    sync(device)

    if not args.skip_reference:
        bs = args.ref_batch or (32 if gpu else 8)
        ref_model.to(device)
        reference_scores(ref_model, tok, query, docs[:2], args.ratio, bs, device)  # warm-up
        ref, t_ref = timed(lambda: reference_scores(ref_model, tok, query, docs, args.ratio, bs, device), device)
        rate = len(docs) / t_ref
        diff = max(abs(ref[i] - ours[i]) for i in range(len(docs))) if ours else float("nan")
        results["transformers"] = {"pairs_per_s": rate, "seconds": t_ref, "max_abs_diff_vs_ours": diff, "batch": bs}
        print(f"transformers (cold, batch {bs}): {rate:9.1f} pairs/s ({t_ref:.2f} s)  max |score diff| = {diff:.2e}")
        for mode, row in results["ours"].items():
            print(f"  ratio ours/transformers [{mode}]: cold {row['cold_pairs_per_s'] / rate:.2f}x  "
                  f"warm {row['warm_pairs_per_s'] / rate:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


def store_mode(args, folder, query, query2, docs, device, dtype, rng):
    from engine import EngineConfig, Reranker
    from engine.scaleout.index_job import run_index

    out = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    with open(tmp / "corpus.jsonl", "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": f"d{i}", "text": d}) + "\n")
    ids = [{"id": f"d{i}"} for i in range(len(docs))]
    for mode in args.modes:
        store = tmp / f"store-{mode}"
        config = EngineConfig(model=str(folder), device=device, dtype=dtype, cache_cross_kv=mode == "kv")
        rep = run_index(str(tmp / "corpus.jsonl"), str(store), compression_ratio=args.ratio, progress=False,
                        config=config)
        # Index throughput without the model load: the job's time less a same-process engine start.
        rr_plain = Reranker(config=config)  # no store: cold encoding of the texts
        rr_plain.rank(words(rng, 5), [words(rng, 70)] * 2, compression_ratio=args.ratio)  # warm-up
        rr_plain.engine.passage_cache.clear()
        st = {}
        _, t_enc = timed(lambda: rr_plain.rank(query, docs, compression_ratio=args.ratio, stats=st), device)
        rr_plain = None  # one model in memory at a time
        rr = Reranker(config=config.replace(passage_store=str(store)))
        rr.rank(words(rng, 5), [words(rng, 70)] * 2, compression_ratio=args.ratio)  # warm-up (text, not stored)
        sc = {}
        _, t_cold = timed(lambda: rr.rank(query, ids, stats=sc), device)
        assert sc["passages_encoded"] == 0 and sc["store_reads"] == len(docs), sc
        warm = []
        for _ in range(args.repeat):
            sw = {}
            _, t = timed(lambda: rr.rank(query2, ids, stats=sw), device)
            assert sw["passages_encoded"] == 0 and sw["store_reads"] == 0, sw
            warm.append(t)
        t_warm = min(warm)
        n = len(docs)
        row = {"index_s": rep.seconds, "index_passages_per_s_incl_load": rep.passages_per_s,
               "store": rep.store, "encode_cold_s": t_enc, "encode_cold_encoder_s": st["encode_s"],
               "store_cold_s": t_cold, "store_warm_s": t_warm, "encode_cold_pairs_per_s": n / t_enc,
               "store_cold_pairs_per_s": n / t_cold, "store_warm_pairs_per_s": n / t_warm,
               "encoder_pairs_per_s": n / st["encode_s"] if st["encode_s"] else None}
        out[mode] = row
        print(f"store [{mode:6s}] index {n} passages in {rep.seconds:.1f} s incl. model load "
              f"(encoding alone: {n / st['encode_s']:.1f} passages/s); "
              f"store {rep.store['disk_bytes'] / 2**20:.1f} MiB, "
              f"{rep.store['data_bytes'] / n / 1024:.0f} KiB/passage of tensors")
        print(f"  {n}-doc rerank: cold encoding {t_enc * 1000:.0f} ms ({n / t_enc:.1f} pairs/s)  from the store "
              f"{t_cold * 1000:.0f} ms ({n / t_cold:.1f} pairs/s, {t_enc / t_cold:.2f}x)  pool in front "
              f"{t_warm * 1000:.0f} ms ({n / t_warm:.1f} pairs/s, {t_enc / t_warm:.2f}x)")
        rr = None
    return out


if __name__ == "__main__":
    main()
