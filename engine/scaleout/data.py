"""Offline jobs on Ray Data: score (query, document) pairs or embed texts from a file, over a cluster.

    run_batch("rank", "pairs.parquet", "scores.parquet", model=M, concurrency=2)
    rerank-engine batch rank --model M --input pairs.jsonl --output scores.parquet [--ray-address ADDR]

Input: parquet or JSONL with ``query`` and ``document`` (or ``text``) columns for
``rank``, ``text`` for ``embed``, and an optional ``id`` column (default: the row
number, from 0). Output: parquet with ``id`` and ``score`` (or ``embedding``), in
input order. Rows whose texts are empty or not strings (and JSONL lines that are
not JSON objects) go to the errors file, ``{"id", "reason"}`` per line; the rest go on.

Each actor of the pool holds one engine (one model on one device) and scores
batches of rows (``map_batches``). An actor that dies is restarted by Ray and its
unfinished batches run again (``max_restarts``, ``max_task_retries``); results are
kept once per row (by row number), and a row with no result fails the job, so
every row is scored exactly once in the output.
"""
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from engine.config import EngineConfig
from engine.scaleout.local import check_ray, init, scrub_env

log = logging.getLogger("engine.scaleout.data")
TASKS = ("rank", "embed")
# Test hook: "N:PATH" makes the first actor that finishes N batches create PATH and exit before returning
# the Nth batch's results, once per job (PATH exists afterwards), so a test kills an actor mid-job.
CRASH_ENV = "RERANK_ENGINE_BATCH_CRASH"


@dataclass
class BatchReport:
    """What a job did: rows read, written and refused, and how fast."""
    task: str
    rows: int  # in the input
    written: int  # scored or embedded rows in the output
    errors: int  # rows in the errors file
    seconds: float
    output: str
    errors_path: str
    startup_s: float = 0.0  # until the first results came back (actors starting, models loading)
    first_rows: int = 0  # rows of that first result

    @property
    def rows_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_rows_per_s(self) -> float:
        """Throughput once the first results are back (model loading excluded)."""
        rest = self.seconds - self.startup_s
        return (self.written - self.first_rows) / rest if rest > 0 else 0.0


# Reading and checking the input (on the driver: row numbers must be those of the file)

def _text_columns(task: str, names) -> Tuple[str, ...]:
    if task == "embed":
        want = ("text",)
    else:
        want = ("query", "document" if "document" in names or "text" not in names else "text")
    missing = [c for c in want if c not in names]
    if missing:
        raise ValueError(f"the input has no {missing[0]!r} column (it has {', '.join(map(str, names)) or 'none'}); "
                         f"{task} reads {' and '.join(want)}")
    return want


def _reason(value, column: str) -> Optional[str]:
    if value is None:
        return f"{column} is null"
    if not isinstance(value, str):
        return f"{column} is {type(value).__name__}, not a string"
    if not value.strip():
        return f"{column} is empty"
    return None


def read_input(path: str, task: str):
    """(rows ``{"_row", "id", texts...}`` as an arrow table, errors ``[(id, reason)]``, row count)."""
    import pyarrow as pa

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if not os.path.isfile(path):
        raise ValueError(f"the input file {path} does not exist")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
        names = pq.read_schema(path).names
    elif path.endswith((".jsonl", ".json")):
        records, names = [], set()
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    v = json.loads(line)
                except json.JSONDecodeError as e:
                    v = ValueError(f"line {n + 1} is not valid JSON ({e.msg})")
                if not isinstance(v, (dict, ValueError)):
                    v = ValueError(f"line {n + 1} is a JSON {type(v).__name__}, not an object")
                if isinstance(v, dict):
                    names.update(v)
                records.append(v)
        names = sorted(names)
    else:
        raise ValueError(f"{path}: the input must be .parquet or .jsonl")
    columns = _text_columns(task, names)
    has_id = "id" in names
    good = {"_row": [], "id": [], **{c: [] for c in columns}}
    errors: List[Tuple[object, str]] = []
    seen_ids = set()
    for row, r in enumerate(records):
        rid = r.get("id") if has_id and isinstance(r, dict) else row
        if has_id and isinstance(r, dict):
            if rid is None or isinstance(rid, (dict, list, float)):
                raise ValueError(f"{path}: row {row} has the id {rid!r}; ids must be strings or integers")
            if rid in seen_ids:
                raise ValueError(f"{path}: the id {rid!r} appears twice; ids must be unique")
            seen_ids.add(rid)
        if isinstance(r, ValueError):
            errors.append((rid, str(r)))
            continue
        reason = next((x for x in (_reason(r.get(c), c) for c in columns) if x), None)
        if reason is not None:
            errors.append((rid, reason))
            continue
        good["_row"].append(row)
        good["id"].append(rid)
        for c in columns:
            good[c].append(r[c])
    if has_id and len({type(i) for i in good["id"]}) > 1:
        raise ValueError(f"{path}: the id column mixes strings and integers")
    table = pa.table({"_row": pa.array(good["_row"], pa.int64()), "id": good["id"],
                      **{("document" if c == "text" and task == "rank" else c): good[c] for c in columns}})
    return table, errors, len(records)


# The actors

class _Worker:
    """One engine per actor: ``__call__`` scores (or embeds) one batch of rows."""

    def __init__(self, task: str, config, threads: Optional[int], crash: Optional[str]):
        scrub_env()
        import torch

        if threads and not torch.cuda.is_available():
            torch.set_num_threads(threads)
        from engine.api import Embedder, Reranker

        self.task, self.crash, self.batches = task, crash, 0
        self.model = (Reranker if task == "rank" else Embedder)(config=config)  # an EngineConfig

    def __call__(self, batch):
        import pyarrow as pa

        if self.task == "rank":
            pairs = list(zip(batch["query"].to_pylist(), batch["document"].to_pylist()))
            out = pa.array(np.asarray(self.model.predict(pairs), dtype=np.float32))
            name = "score"
        else:
            emb = np.ascontiguousarray(self.model.embed(batch["text"].to_pylist()), dtype=np.float32)
            out = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
            name = "embedding"
        self.batches += 1
        self._maybe_crash()
        return pa.table({"_row": batch["_row"], name: out})

    def _maybe_crash(self):
        if not self.crash:
            return
        after, path = self.crash.split(":", 1)
        if self.batches < int(after):
            return
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)  # as a crash would: no cleanup, the batch's results lost


# The job

class Results:
    """Result tables kept once per row: a batch that ran twice (its actor lost after handing it over, and
    the task retried) adds nothing the second time."""

    def __init__(self, n_rows: int):
        self.seen = np.zeros(n_rows, dtype=bool)
        self.tables: list = []
        self.rows = 0

    def add(self, out) -> int:
        """Keep the rows of ``out`` not seen before; -> how many."""
        import pyarrow as pa

        rows = out["_row"].to_numpy()
        fresh = ~self.seen[rows]
        fresh &= ~_repeated(rows)  # a row twice within one table counts once too
        self.seen[rows] = True
        if not fresh.all():
            out = out.filter(pa.array(fresh))
        if out.num_rows:
            self.tables.append(out)
        self.rows += out.num_rows
        return out.num_rows


def _repeated(rows: np.ndarray) -> np.ndarray:
    """True at every occurrence of a value but its first."""
    _, first = np.unique(rows, return_index=True)
    mask = np.ones(len(rows), dtype=bool)
    mask[first] = False
    return mask


def _write_errors(path: str, errors) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rid, reason in errors:
            f.write(json.dumps({"id": rid, "reason": reason}, ensure_ascii=False) + "\n")


def _default_errors_path(output: str) -> str:
    stem = output[:-len(".parquet")] if output.endswith(".parquet") else output
    return stem + ".errors.jsonl"


def run_batch(task: str, input: str, output: str, model: Optional[str] = None, *, ray_address: Optional[str] = None,
              concurrency: int = 1, batch_size: int = 1024, num_cpus: float = 1, num_gpus: Optional[float] = None,
              threads: Optional[int] = None, errors_path: Optional[str] = None, progress: bool = True,
              config: Optional[EngineConfig] = None, **engine) -> BatchReport:
    """Score the pairs (``task="rank"``) or embed the texts (``"embed"``) of ``input`` into ``output`` (parquet),
    on ``concurrency`` actors of a Ray cluster (``ray_address``, or a local instance on 127.0.0.1).

    Each actor takes ``num_cpus`` cores (``threads`` torch threads, default the same) and ``num_gpus`` GPUs
    (default: 1 where the cluster has GPUs and ``device`` is not cpu) and holds one engine, made from
    ``config`` (an EngineConfig) with ``engine``'s options over it (task, device, dtype, max_length, ...).
    Bad rows go to ``errors_path`` (default: beside the output, ``*.errors.jsonl``).
    """
    check_ray()  # without the extra: one line naming it, not a ModuleNotFoundError of pyarrow
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    if not output.endswith(".parquet"):
        raise ValueError(f"the output must be a .parquet file, got {output}")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise ValueError(f"the output folder {folder} does not exist")
    for name, v in (("concurrency", concurrency), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    config = EngineConfig.build(config, model=model, **engine)
    errors_path = errors_path or _default_errors_path(output)
    table, errors, n_rows = read_input(input, task)
    _write_errors(errors_path, errors)
    start = time.perf_counter()
    n = table.num_rows
    results = Results(n_rows)
    startup_s, first_rows = 0.0, 0
    if n:
        ray = init(ray_address)
        if num_gpus is None:
            cpu_only = str(config.device or "").startswith("cpu")
            num_gpus = 1 if not cpu_only and ray.cluster_resources().get("GPU", 0) >= 1 else 0
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts rows; Ray's count blocks
        # One batch per block, so one task per batch: the actors share the work evenly and a lost
        # actor loses one batch.
        blocks = [table.slice(i, batch_size) for i in range(0, n, batch_size)]
        crash = os.environ.get(CRASH_ENV)
        ds = ray.data.from_arrow(blocks).map_batches(
            _Worker, batch_size=batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_cpus=num_cpus, num_gpus=num_gpus or None,
            fn_constructor_kwargs={"task": task, "config": config,
                                   "threads": threads or max(1, int(num_cpus)), "crash": crash},
            max_restarts=-1, max_task_retries=-1)
        bar = tqdm(total=n, desc=f"batch {task}", unit="row", disable=not progress, file=sys.stderr,
                   smoothing=0.1)
        for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            kept = results.add(out)
            if not first_rows:
                startup_s, first_rows = time.perf_counter() - start, kept
            bar.update(kept)
        bar.close()
        missing = n - results.rows
        if missing:
            raise RuntimeError(f"{missing} rows came back without a result; nothing was written")
    seconds = time.perf_counter() - start
    value = "score" if task == "rank" else "embedding"
    if results.tables:
        done = pa.concat_tables(results.tables)
        order = np.argsort(done["_row"].to_numpy(), kind="stable")
        done = done.take(pa.array(order))
    else:
        dim = pa.float32() if task == "rank" else pa.list_(pa.float32())
        done = pa.table({"_row": pa.array([], pa.int64()), value: pa.array([], dim)})
    # Input order: the good rows are in row order, and so is ``done``.
    assert done["_row"].to_pylist() == table["_row"].to_pylist()
    pq.write_table(pa.table({"id": table["id"], value: done[value]}), output)
    report = BatchReport(task, n_rows, done.num_rows, len(errors), seconds, output, errors_path, startup_s, first_rows)
    log.info("%s: %d rows in %.1f s (%.0f rows/s); %d bad rows in %s; wrote %s", task, report.written, seconds,
             report.rows_per_s, report.errors, errors_path, output)
    return report
