"""End-to-end cross-encoder throughput: our engine vs transformers' padded batches, same process.

Workload "rerank-1k": one query, documents of uniform 64-448
tokens, random weights at the real shapes:
  xlmr         bge-reranker-v2-m3 (XLMRobertaForSequenceClassification: 24 layers,
               hidden 1024, 16 heads, intermediate 4096, vocab 250002, max 8192)
  bert-minilm  ms-marco-MiniLM-L-6 (BertForSequenceClassification: 6 layers,
               hidden 384, 12 heads, intermediate 1536, vocab 30522, max 512)
The reference is transformers with padded batches of 32, sorted by length (as
sentence-transformers' CrossEncoder and FlagEmbedding do). On CPU the defaults
shrink the run (64 documents; xlmr with 2 layers) so it ends in under 2 minutes.

    python bench/e2e_crossencoder.py --family bert-minilm
    python bench/e2e_crossencoder.py --family xlmr --layers 2 --docs 64
    python bench/e2e_crossencoder.py --family xlmr --docs 1024        # GPU, full shape
    python bench/e2e_crossencoder.py --family xlmr --compile both --latency-docs 100
"""
import argparse
import random
import shutil
import string
from pathlib import Path

import torch

from checkpoints import WORDS, minilm_tokenizer_dir, save_random_model, words
from common import latency_ms, machine, timed, write_json

SHAPES = {
    "xlmr": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 vocab_size=250002, max_position_embeddings=8194, type_vocab_size=1, pad_token_id=1,
                 bos_token_id=0, eos_token_id=2),
    "bert-minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                        vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0),
}
CPU_LAYERS = {"xlmr": 2, "bert-minilm": 6}
# --tiny (bench/gpu_suite.py --smoke): the family's layout at a few MB (the XLM-R bench vocabulary has under 200
# pieces; BERT keeps the MiniLM vocabulary's 30522 ids)
TINY = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128)
TINY_VOCAB = {"xlmr": 1000, "bert-minilm": 30522}


def build_folder(family: str, layers: int, device: str, dtype: torch.dtype, tiny: bool = False) -> Path:
    """A random-weight checkpoint at the family's shape, saved as safetensors, with a tokenizer (built first, so
    that a missing tokenizer fails before the model's initialisation)."""
    import transformers as tf

    shape = dict(SHAPES[family], num_hidden_layers=layers)
    if tiny:
        shape.update(TINY, vocab_size=TINY_VOCAB[family])
    if family == "xlmr":
        # The real 250k SentencePiece vocabulary is not shipped; a small Unigram vocabulary with the
        # real XLM-R pipeline gives the same <s> q </s></s> d </s> layout (every bench word is one piece).
        pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0)]
        pieces += [("\u2581" + w, -5.0) for w in sorted(set(WORDS))]
        pieces += [("\u2581", -8.0)] + [(c, -10.0) for c in string.ascii_lowercase + string.punctuation]
        tok = tf.XLMRobertaTokenizer(vocab=pieces, model_max_length=8192)
        cfg = tf.XLMRobertaConfig(num_labels=1, initializer_range=0.02, **shape)
        cls = tf.XLMRobertaForSequenceClassification
    else:
        src = minilm_tokenizer_dir()  # the all-MiniLM-L6-v2 tokenizer: the ms-marco MiniLM vocabulary
        cfg = tf.BertConfig(num_labels=1, initializer_range=0.02, **shape)
        cls = tf.BertForSequenceClassification
    folder = save_random_model(cls, cfg, family, device, dtype, prefix="bench-ce-")
    if family == "xlmr":
        tok.save_pretrained(str(folder))
    else:
        for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(src / f, folder / f)
    return folder


def reference_scores(model, tok, pairs, batch_size: int, max_length: int, sort: bool):
    """transformers, padded batches (sentence-transformers CrossEncoder recipe)."""
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][1])) if sort else list(range(len(pairs)))
    out = [0.0] * len(pairs)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = tok([pairs[i][0] for i in idx], [pairs[i][1] for i in idx], padding=True,
                        truncation="longest_first", max_length=max_length, return_tensors="pt").to(model.device)
            for i, v in zip(idx, model(**batch).logits[:, 0].float().tolist()):
                out[i] = v
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="bert-minilm", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="encoder layers (default: the real count on GPU, "
                                                             "xlmr 2 / bert-minilm 6 on CPU)")
    ap.add_argument("--docs", type=int, default=None, help="documents (default 1024 on GPU, 64 on CPU)")
    ap.add_argument("--ref-batch", type=int, default=32)
    ap.add_argument("--ref-unsorted", action="store_true", help="reference batches in input order")
    ap.add_argument("--max-batch-tokens", type=int, default=None)
    ap.add_argument("--compile", choices=["off", "on", "both"], default="off",
                    help="run our engine eager (off), through torch.compile (on), or both")
    ap.add_argument("--latency-docs", type=int, default=0, help="also time one request of N documents (p50/p99)")
    ap.add_argument("--latency-reps", type=int, default=None, help="requests timed (default 20 GPU, 5 CPU)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="hidden 64, 4 heads (bench/gpu_suite.py --smoke)")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from engine import Reranker

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layers = args.layers or (SHAPES[args.family]["num_hidden_layers"] if device == "cuda" else CPU_LAYERS[args.family])
    n_docs = args.docs or (1024 if device == "cuda" else 64)
    rng = random.Random(0)
    query = words(rng, 20)
    docs = [words(rng, rng.randint(64, 448)) for _ in range(n_docs)]
    pairs = [(query, d) for d in docs]
    folder = build_folder(args.family, layers, device, dtype, tiny=args.tiny)

    results = {"machine": machine(), "family": args.family, "layers": layers, "pairs": len(pairs), "ours": {}}
    reps = args.latency_reps or (20 if device == "cuda" else 5)
    lat_docs = docs[: args.latency_docs]
    ours, ours_rate = None, 0.0
    for compile_ in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
        rr = Reranker(str(folder), device=device, dtype=dtype, max_batch_tokens=args.max_batch_tokens,
                      compile=compile_)
        max_length = rr.engine.template.max_length
        enc = rr.engine.template.encode([query] * len(docs), docs)
        tokens = results["tokens"] = sum(len(s) for s in enc.ids)
        if not results["ours"]:
            print(f"machine: {machine()}  family: {args.family}  layers: {layers}  pairs: {len(pairs)}  "
                  f"tokens/pair: {tokens / len(pairs):.0f}  dtype: {dtype}")
        for n in (8, 64):  # warm-up (a compiled forward compiles here, for dynamic shapes)
            rr.predict(pairs[:n])
        rr.stats.clear()
        prev = ours
        ours, t = timed(lambda: rr.predict(pairs, raw_scores=True), device)
        if compile_ and prev is not None:  # compile=True must score as eager
            results["compile_max_abs_diff_vs_eager"] = max(abs(a - b) for a, b in zip(ours, prev))
            print(f"compile vs eager: max |logit diff| = {results['compile_max_abs_diff_vs_eager']:.2e}")
        ours_rate = max(ours_rate, len(pairs) / t)
        key = f"max_batch_tokens={rr.engine.max_batch_tokens}" + (" compile" if compile_ else "")
        row = results["ours"][key] = {"pairs_per_s": len(pairs) / t, "seconds": t, "stats": dict(rr.stats)}
        print(f"ours ({key}): {len(pairs) / t:9.1f} pairs/s  ({t:.2f} s)")
        if lat_docs:
            row["latency"] = latency_ms(lambda rep: rr.predict([(f"{rep} {query}", d) for d in lat_docs]),
                                        device, reps)
            print(f"  one request of {len(lat_docs)} documents: p50 {row['latency']['p50_ms']:.1f} ms, "
                  f"p99 {row['latency']['p99_ms']:.1f} ms")
        write_json(args.json, results)
        del rr

    if not args.skip_reference:
        tok = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=dtype).to(device).eval()
        sort = not args.ref_unsorted
        reference_scores(model, tok, pairs[:4], args.ref_batch, max_length, sort)  # warm-up
        ref, t = timed(lambda: reference_scores(model, tok, pairs, args.ref_batch, max_length, sort), device)
        rate = len(pairs) / t
        diff = max(abs(a - b) for a, b in zip(ref, ours))
        name = f"transformers (padded, batch {args.ref_batch}{', sorted' if sort else ''})"
        results["reference"] = {"name": name, "pairs_per_s": rate, "seconds": t, "max_abs_diff_vs_ours": diff}
        write_json(args.json, results)
        print(f"{name}: {rate:9.1f} pairs/s  ({t:.2f} s)  ratio ours/ref = {ours_rate / rate:.2f}x  "
              f"max |logit diff| = {diff:.2e}")
        if lat_docs:  # one padded batch of all the documents
            lat = latency_ms(lambda rep: reference_scores(model, tok, [(f"{rep} {query}", d) for d in lat_docs],
                                                          len(lat_docs), max_length, sort), device, reps)
            results["reference"]["latency"] = lat
            print(f"  one request of {len(lat_docs)} documents: p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
