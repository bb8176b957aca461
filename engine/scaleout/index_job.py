"""``rerank-engine index``: encode a corpus once into a KaLM-Reranker passage store (engine/core/store.py).

    run_index("corpus.jsonl", "store/", model=M, compression_ratio=4)
    rerank-engine index MODEL --input corpus.{jsonl,parquet} --store DIR [--compression-ratio R]

Rows are ``{"id", "text"}`` (an integer id is taken as its decimal string). A bad row (not an
object, an id that is not a string or integer, an empty or non-string text, an id seen before
with another text, here or in the store) goes to the errors file, ``{"row", "id", "reason"}`` per
line; the rest go on. Passages are encoded in packed batches of the engine's token budget and each
batch is committed to the store at once, so a job killed at any point and run again encodes only
the ids the store lacks. ``verify``: read every stored entry first and encode again those whose
bytes fail their checksum.
"""
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from engine.config import EngineConfig
from engine.core.store import PassageStore, encode_rows, engine_identity, text_digest

log = logging.getLogger("engine.index")
# Test hook: "N" makes the job SIGKILL itself in its Nth store write, after the passages' bytes are on
# disk and before their rows are committed (the worst moment), so a test kills it mid-job.
CRASH_ENV = "RERANK_ENGINE_INDEX_CRASH"


@dataclass
class IndexReport:
    rows: int  # in the input
    encoded: int  # written to the store by this job
    already_stored: int  # skipped: the store had them (a resumed job)
    duplicates: int  # repeated rows with the same id and text
    errors: int  # rows in the errors file
    repaired: int  # damaged entries encoded again (verify)
    seconds: float
    errors_path: str
    store: dict  # PassageStore.stats() at the end

    @property
    def passages_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def read_corpus(path: str) -> Iterator[Tuple[int, object]]:
    """(row number, row) of a JSONL or parquet corpus; a JSONL line that is not JSON yields its error text."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = {"id", "text"} - set(table.column_names)
        if missing:
            raise ValueError(f"{path}: no {', '.join(sorted(missing))} column (rows are {{id, text}})")
        for i, row in enumerate(table.select(["id", "text"]).to_pylist()):
            yield i, row
        return
    if not path.endswith(".jsonl"):
        raise ValueError(f"{path}: the corpus must be .jsonl or .parquet")
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, ValueError(f"not JSON ({e.msg})")


def _check(row) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(id, text, reason): reason is None for a good row."""
    if isinstance(row, Exception):
        return None, None, str(row)
    if not isinstance(row, dict):
        return None, None, f"a row must be an object {{id, text}}, got {type(row).__name__}"
    pid = row.get("id")
    if isinstance(pid, int) and not isinstance(pid, bool):
        pid = str(pid)
    if not isinstance(pid, str) or not pid:
        return None, None, f"id must be a non-empty string or an integer, got {pid!r}"
    text = row.get("text")
    if not isinstance(text, str):
        return pid, None, f"text must be a string, got {type(text).__name__}"
    if not text.strip():
        return pid, None, "text is empty"
    return pid, text, None


def _batches(tokens: List[List[int]], budget: int) -> Iterator[List[int]]:
    """Indices of ``tokens`` in packed batches of at most ``budget`` tokens (one passage at least)."""
    batch: List[int] = []
    n = 0
    for k, t in enumerate(tokens):
        if batch and n + len(t) > budget:
            yield batch
            batch, n = [], 0
        batch.append(k)
        n += len(t)
    if batch:
        yield batch


class _Encoder:
    """One engine per Ray actor: encodes a batch of ``{id, text}`` rows into stored rows (bytes)."""

    def __init__(self, config, ratio: int):
        from engine.scaleout.local import scrub_env

        scrub_env()
        from engine.api import Reranker

        self.rr, self.ratio = Reranker(config=config), ratio

    def __call__(self, batch):
        from array import array

        import pyarrow as pa

        eng = self.rr.engine
        texts = batch["text"].to_pylist()
        tokens = eng.template.encode_documents(texts)
        rows: List[bytes] = [b""] * len(texts)
        for b in _batches(tokens, eng.max_batch_tokens):
            for j, r in zip(b, encode_rows(eng.model, [tokens[j] for j in b], self.ratio, eng.device,
                                           eng.config.cache_cross_kv)):
                rows[j] = r.contiguous().numpy().tobytes()
        return pa.table({"id": batch["id"], "text": batch["text"],
                         "tokens": pa.array([array("i", t).tobytes() for t in tokens], pa.binary()),
                         "rows": pa.array(rows, pa.binary())})


def _encode_on_ray(todo, store, config, ratio, ray_address, concurrency, write, batch_size: int = 256) -> None:
    """Ray Data actors encode, this process writes (engine/scaleout/data.py's actor-pool pattern). A batch
    that runs twice (an actor lost and its task retried) writes nothing twice: stored ids are skipped."""
    from array import array

    import pyarrow as pa
    import torch

    from engine.scaleout.local import init

    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
    ray = init(None if ray_address == "local" else ray_address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    table = pa.table({"id": [p for p, _ in todo], "text": [t for _, t in todo]})
    # Blocks of at most batch_size rows, at least 4 per actor: every actor gets work, a lost one loses little.
    batch_size = max(1, min(batch_size, -(-table.num_rows // (4 * concurrency))))
    blocks = [table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size)]
    ds = ray.data.from_arrow(blocks).map_batches(
        _Encoder, batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=1, fn_constructor_kwargs={"config": config, "ratio": ratio}, max_restarts=-1, max_task_retries=-1)
    for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        cols = out.to_pydict()
        entries = []
        for pid, text, tok, data in zip(cols["id"], cols["text"], cols["tokens"], cols["rows"]):
            rows = torch.frombuffer(bytearray(data), dtype=store.dtype).view(-1, *store.row_shape)
            entries.append((pid, text, list(array("i", tok)), rows))
        write(entries)


def run_index(input: str, store_dir: str, model: Optional[str] = None, *, compression_ratio: Optional[int] = None,
              errors_path: Optional[str] = None, progress: bool = True, verify: bool = False,
              ray_address: Optional[str] = None, concurrency: int = 1,
              config: Optional[EngineConfig] = None) -> IndexReport:
    """Encode the passages of ``input`` the store at ``store_dir`` lacks (creating it at ``compression_ratio``,
    default 4). ``ray_address``: shard the encoding over ``concurrency`` Ray Data actors (a local Ray
    instance for "local"); this process stays the store's one writer."""
    from tqdm import tqdm

    from engine.api import Reranker
    from engine.core.passages import check_ratio

    t0 = time.perf_counter()
    config = EngineConfig.build(config, model=model).replace(passage_store=None)
    rows = list(read_corpus(input))  # read before loading the model: a bad path fails fast
    errors_path = errors_path or str(Path(store_dir) / "index-errors.jsonl")
    rr = Reranker(config=config)
    eng = rr.engine
    if not rr.is_encoder_decoder:
        raise ValueError(f"index needs an encoder-decoder reranker (KaLM-Reranker); {eng.arch} is not one")
    identity = engine_identity(eng)
    exists = (Path(store_dir) / "store.sqlite").is_file()
    if exists and compression_ratio is None:
        store = PassageStore(store_dir, identity=identity, writer=True)
    else:
        store = PassageStore(store_dir, identity=identity, ratio=check_ratio(compression_ratio), create=True,
                             writer=True)
    ratio = store.ratio
    try:
        repaired = 0
        if verify:
            bad = store.verify()
            if bad:
                log.warning("%d damaged entries in %s: encoding them again", len(bad), store_dir)
                store.remove(bad)
                repaired = len(bad)
        errors: List[dict] = []
        seen = {}
        good: List[Tuple[str, str]] = []
        duplicates = 0
        for i, row in rows:
            pid, text, reason = _check(row)
            if reason is None and pid in seen:
                if seen[pid] != text_digest(text):
                    reason = "duplicate id with a different text"
                else:
                    duplicates += 1
                    continue
            if reason is not None:
                errors.append({"row": i, "id": pid, "reason": reason})
                continue
            seen[pid] = text_digest(text)
            good.append((pid, text))
        stored = {}
        for s in range(0, len(good), 1000):
            stored.update(store.text_digests(p for p, _ in good[s:s + 1000]))
        todo = []
        for pid, text in good:
            if pid in stored:
                if stored[pid] != seen[pid]:
                    errors.append({"row": None, "id": pid, "reason": "duplicate id with a different text "
                                                                     "(the store holds another)"})
                continue
            todo.append((pid, text))
        already = len(good) - len(todo) - sum(1 for e in errors if e["row"] is None)
        bar = tqdm(total=len(todo), desc="index", unit="passage", disable=not progress, file=sys.stderr)
        encoded = writes = 0
        crash = int(os.environ[CRASH_ENV]) if os.environ.get(CRASH_ENV) else None

        def write(entries):
            nonlocal encoded, writes
            writes += 1
            if crash == writes:
                store.crash_before_commit = True
            encoded += store.append(entries)
            bar.update(len(entries))

        if ray_address is not None and todo:
            _encode_on_ray(todo, store, config, ratio, ray_address, concurrency, write)
        else:
            for s in range(0, len(todo), 256):
                chunk = todo[s:s + 256]
                tokens = eng.template.encode_documents([t for _, t in chunk])
                for batch in _batches(tokens, eng.max_batch_tokens):
                    out = encode_rows(eng.model, [tokens[j] for j in batch], ratio, eng.device,
                                      eng.config.cache_cross_kv)
                    write([(chunk[j][0], chunk[j][1], tokens[j], r) for j, r in zip(batch, out)])
        bar.close()
        if errors or Path(errors_path).exists():
            with open(errors_path, "w", encoding="utf-8") as f:
                for e in errors:
                    f.write(json.dumps(e, ensure_ascii=False) + "\n")
        return IndexReport(len(rows), encoded, already, duplicates, len(errors), repaired,
                           time.perf_counter() - t0, errors_path, store.stats())
    finally:
        store.close()
