"""KaLM-Reranker's passage store: a corpus encoded once, on disk, read by any number of processes.

The encoder of an encoder-decoder reranker sees only the passage, so a passage's encoding
(the Matryoshka-pooled encoder states, or every decoder layer's cross K/V, as the engine's
``cache_cross_kv`` decides) is computed once at index time and read back at query time.

Layout of a store folder:
  store.sqlite       SQLite (WAL journal): the store's identity (``meta``) and one row per
                     passage id (``passages``): its text digest, its encoder tokens (int32), where
                     its rows lie and their checksum.
  shard-NNNNN.bin    append-only files of raw tensor bytes, rotated at ``SHARD_BYTES``.
  writer.lock        held (flock) by the one writer; readers never take it.

Why SQLite and shard files rather than LMDB: SQLite ships with Python (no dependency), its WAL
mode lets any number of reader processes run beside one writer, and an entry's bytes are read
with ``os.pread`` rather than through a memory map, so a damaged or truncated shard is an
error (the checksum fails) and never a SIGBUS that would take the server down with it.

An entry is written in two steps: its bytes are appended to the shard and fsynced, then its row
is committed in one SQLite transaction. A crash between the two leaves unreferenced bytes at the
end of a shard and no row: the id is missing, and the next index job encodes it again. A row is
only ever inserted for an id that has none (``id`` is the primary key), so an id is never
written twice. Every read checks the entry's length and blake2b checksum.
"""
import fcntl
import hashlib
import json
import logging
import os
import signal
import sqlite3
import threading
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from engine.context import build_context
from engine.core.passages import matryoshka_pool

log = logging.getLogger("engine.store")

FORMAT = 1
SHARD_BYTES = 1 << 30
DB = "store.sqlite"
SAMPLE_BYTES = 1 << 16  # bytes of each weight file folded into the model's fingerprint

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StoreError(ValueError):
    """A store that cannot be used as asked (another model, ratio or layout; missing)."""


class CorruptEntry(RuntimeError):
    """An entry whose bytes are missing or fail their checksum; it is never served."""


def text_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def model_identity(folder: Path, config_dict: dict, index: dict, dtype: torch.dtype, cache_kv: bool,
                   row_shape: Tuple[int, ...], document_max_length: int) -> Dict[str, object]:
    """What makes two engines' encodings interchangeable: the config, the weights' names, shapes and
    dtypes, a fingerprint of the weight files' bytes, the dtype, the layout and the truncation."""
    cfg = hashlib.blake2b(json.dumps(config_dict, sort_keys=True, default=str).encode(), digest_size=16)
    names = hashlib.blake2b(digest_size=16)
    files = set()
    for name in sorted(index):
        info = index[name]
        names.update(f"{name}\0{tuple(info.shape)}\0{info.dtype}\n".encode())
        files.add(info.file)
    sample = hashlib.blake2b(digest_size=16)
    for f in sorted(files):  # the header and the first weights: tells two seeds of one config apart
        path = Path(f) if Path(f).is_absolute() or Path(f).exists() else Path(folder) / f
        sample.update(str(path.stat().st_size).encode())
        with open(path, "rb") as fh:
            sample.update(fh.read(SAMPLE_BYTES))
    return {"format": FORMAT, "config": cfg.hexdigest(), "weights": names.hexdigest(),
            "weights_sample": sample.hexdigest(), "dtype": str(dtype).replace("torch.", ""),
            "layout": "cross_kv" if cache_kv else "states", "row_shape": list(row_shape),
            "document_max_length": int(document_max_length)}


def engine_identity(engine) -> Dict[str, object]:
    """``model_identity`` of a loaded KaLM engine (engine.core.engine.Engine)."""
    from engine.weights import checkpoint_index

    return model_identity(engine.folder, engine.config_dict, checkpoint_index(engine.folder), engine.dtype,
                          engine.config.cache_cross_kv, row_shape(engine.model, engine.config.cache_cross_kv),
                          engine.template.document_max_length)


def row_shape(model, cache_kv: bool) -> Tuple[int, ...]:
    """One stored row: ``[H]`` (pooled states) or ``[layers, 2, Hkv, D]`` (cross K/V)."""
    if not cache_kv:
        return (model.hidden_size,)
    attn = model.decoder.layers[0].self_attn
    return (len(model.decoder.layers), 2, attn.num_kv_heads, attn.head_dim)


@dataclass(frozen=True)
class StoredRef:
    """Where one stored passage lies; ``read()`` returns its rows ``[rows, *row_shape]``."""

    store: "PassageStore"
    id: str
    tokens: List[int]
    rows: int
    shard: int
    offset: int
    nbytes: int
    checksum: bytes

    def read(self) -> torch.Tensor:
        return self.store.read(self)


class PassageStore:
    """One store folder. ``PassageStore.open(folder)`` reads; ``create=True`` makes it if missing
    (with ``identity`` and ``ratio``); ``writer=True`` takes the single-writer lock.

    ``identity`` (``model_identity``) and ``ratio`` given to an existing store must match what it
    records, or StoreError names the difference."""

    def __init__(self, folder, identity: Optional[dict] = None, ratio: Optional[int] = None,
                 create: bool = False, writer: bool = False):
        self.folder = Path(folder)
        db = self.folder / DB
        if not db.is_file():
            if not create:
                raise StoreError(f"no passage store at {self.folder} (build one with `rerank-engine index`)")
            if identity is None or ratio is None:
                raise StoreError("a new passage store needs the model's identity and a compression ratio")
            self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._writer_fd = None
        if writer:
            self._writer_fd = os.open(self.folder / "writer.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(self._writer_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._writer_fd)
                raise StoreError(f"another index job is writing {self.folder}") from None
        self._db = sqlite3.connect(str(db), timeout=60, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS passages (id TEXT PRIMARY KEY, text_digest BLOB NOT NULL, "
                         "tokens BLOB NOT NULL, rows INTEGER NOT NULL, shard INTEGER NOT NULL, "
                         "offset INTEGER NOT NULL, nbytes INTEGER NOT NULL, checksum BLOB NOT NULL)")
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            if not create or identity is None or ratio is None:
                raise StoreError(f"{self.folder}: the passage store has no identity (an index job that never "
                                 f"started); rerun `rerank-engine index`")
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('identity', ?), ('ratio', ?)",
                                 (json.dumps(identity, sort_keys=True), str(int(ratio))))
                self._db.execute("COMMIT")
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        self.identity = json.loads(meta["identity"])
        self.ratio = int(meta["ratio"])
        if identity is not None:
            diff = sorted(k for k in set(identity) | set(self.identity) if identity.get(k) != self.identity.get(k))
            if diff:
                what = ", ".join(f"{k}: store {self.identity.get(k)!r}, engine {identity.get(k)!r}" for k in diff)
                raise StoreError(f"the passage store at {self.folder} was built by another model or setting ({what})")
        if ratio is not None and int(ratio) != self.ratio:
            raise StoreError(f"the passage store at {self.folder} holds compression ratio {self.ratio}, "
                             f"not {ratio}")
        self.row_shape = tuple(self.identity["row_shape"])
        self.dtype = _DTYPES[self.identity["dtype"]]
        self.row_bytes = torch.empty(self.row_shape, dtype=self.dtype).nbytes
        self._fds: Dict[int, int] = {}
        self.crash_before_commit = False

    # -- reading ------------------------------------------------------------------------------------
    def lookup(self, ids: Iterable[str]) -> Dict[str, StoredRef]:
        """The stored entries of ``ids`` (ids not in the store are absent from the answer)."""
        ids = list(dict.fromkeys(ids))
        out: Dict[str, StoredRef] = {}
        with self._lock:
            for s in range(0, len(ids), 500):
                chunk = ids[s:s + 500]
                q = ("SELECT id, tokens, rows, shard, offset, nbytes, checksum FROM passages WHERE id IN (%s)"
                     % ",".join("?" * len(chunk)))
                for pid, tok, rows, shard, offset, nbytes, checksum in self._db.execute(q, chunk):
                    out[pid] = StoredRef(self, pid, list(array("i", tok)), rows, shard, offset, nbytes, checksum)
        return out

    def text_digests(self, ids: Iterable[str]) -> Dict[str, bytes]:
        ids = list(dict.fromkeys(ids))
        out = {}
        with self._lock:
            for s in range(0, len(ids), 500):
                chunk = ids[s:s + 500]
                q = "SELECT id, text_digest FROM passages WHERE id IN (%s)" % ",".join("?" * len(chunk))
                out.update(self._db.execute(q, chunk).fetchall())
        return out

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.folder / f"shard-{shard:05d}.bin", os.O_RDONLY)
        return fd

    def read(self, ref: StoredRef) -> torch.Tensor:
        """The entry's rows ``[rows, *row_shape]``; CorruptEntry when its bytes are short or fail the checksum."""
        try:
            data = os.pread(self._fd(ref.shard), ref.nbytes, ref.offset)
        except OSError as e:
            raise CorruptEntry(f"passage {ref.id!r}: shard {ref.shard} unreadable ({e})") from None
        if len(data) != ref.nbytes or ref.nbytes != ref.rows * self.row_bytes:
            raise CorruptEntry(f"passage {ref.id!r}: {len(data)} of {ref.nbytes} bytes on disk (torn entry)")
        if hashlib.blake2b(data, digest_size=16).digest() != ref.checksum:
            raise CorruptEntry(f"passage {ref.id!r}: checksum mismatch")
        return torch.frombuffer(bytearray(data), dtype=self.dtype).view(ref.rows, *self.row_shape)

    def verify(self) -> List[str]:
        """Ids whose entries fail to read (every entry is read and checked)."""
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM passages")]
        bad = []
        for s in range(0, len(ids), 500):
            for ref in self.lookup(ids[s:s + 500]).values():
                try:
                    self.read(ref)
                except CorruptEntry:
                    bad.append(ref.id)
        return bad

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM passages").fetchone()[0]

    def stats(self) -> Dict[str, object]:
        """Entries, rows, bytes on disk (shards and database) and bytes per passage."""
        with self._lock:
            n, rows, data = self._db.execute("SELECT COUNT(*), COALESCE(SUM(rows), 0), COALESCE(SUM(nbytes), 0) "
                                             "FROM passages").fetchone()
        disk = sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())
        return {"entries": n, "rows": rows, "data_bytes": data, "disk_bytes": disk,
                "bytes_per_passage": (disk / n) if n else 0.0, "ratio": self.ratio,
                "layout": self.identity["layout"], "dtype": self.identity["dtype"]}

    # -- writing (the single writer) ----------------------------------------------------------------
    def remove(self, ids: Iterable[str]) -> None:
        """Forget entries (corrupt ones, before encoding them again)."""
        self._check_writer()
        ids = list(ids)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM passages WHERE id = ?", [(i,) for i in ids])
            self._db.execute("COMMIT")

    def append(self, entries: Sequence[Tuple[str, str, Sequence[int], torch.Tensor]]) -> int:
        """Write ``(id, text, tokens, rows [n, *row_shape])`` entries: bytes first (fsynced), then their
        rows in one transaction. Ids already stored are skipped; returns how many were written."""
        self._check_writer()
        if not entries:
            return 0
        present = set(self.text_digests(e[0] for e in entries))
        shard, path = self._tail()
        fresh, seen = [], set(present)
        with open(path, "ab") as f:
            offset = f.seek(0, os.SEEK_END)
            for pid, text, tokens, rows in entries:
                if pid in seen:
                    continue
                seen.add(pid)
                if tuple(rows.shape[1:]) != self.row_shape or rows.dtype != self.dtype:
                    raise StoreError(f"passage {pid!r}: rows {tuple(rows.shape)} {rows.dtype} do not fit the store "
                                     f"({self.row_shape} {self.dtype})")
                data = rows.detach().contiguous().cpu().numpy().tobytes()
                f.write(data)
                fresh.append((pid, text_digest(text), array("i", tokens).tobytes(), rows.shape[0], shard, offset,
                              len(data), hashlib.blake2b(data, digest_size=16).digest()))
                offset += len(data)
            f.flush()
            os.fsync(f.fileno())
        if self.crash_before_commit:  # the index job's test hook (engine/scaleout/index_job.py)
            os.kill(os.getpid(), signal.SIGKILL)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT INTO passages VALUES (?, ?, ?, ?, ?, ?, ?, ?)", fresh)
            self._db.execute("COMMIT")
        return len(fresh)

    def _tail(self) -> Tuple[int, Path]:
        shards = sorted(self.folder.glob("shard-*.bin"))
        shard = int(shards[-1].stem.split("-")[1]) if shards else 0
        path = self.folder / f"shard-{shard:05d}.bin"
        if path.exists() and path.stat().st_size >= SHARD_BYTES:
            shard += 1
            path = self.folder / f"shard-{shard:05d}.bin"
        return shard, path

    def _check_writer(self) -> None:
        if self._writer_fd is None:
            raise StoreError("this PassageStore was opened for reading (writer=True to write)")

    def close(self) -> None:
        with self._lock:
            self._db.close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._writer_fd is not None:
            os.close(self._writer_fd)
            self._writer_fd = None


# --- encoding for the store and loading into the pool ----------------------------------------------

@torch.inference_mode()
def encode_rows(model, seqs: Sequence[List[int]], ratio: int, device, cache_kv: bool) -> List[torch.Tensor]:
    """The stored rows of each passage (one packed encoder batch): ``[ceil(n / r), *row_shape]``
    on the CPU, as the engine's pool would hold them."""
    ids, ctx = build_context(list(seqs), device)
    pooled = matryoshka_pool(model.encode(ids, ctx), ctx.positions, ctx.seq_lens, ratio)
    if cache_kv:
        kv = []
        for layer in model.decoder.layers:
            k, v = layer.self_attn.cross_kv(pooled)  # [N, Hkv, D]
            kv.append(torch.stack((k, v), 1))  # [N, 2, Hkv, D]
        pooled = torch.stack(kv, 1)  # [N, layers, 2, Hkv, D]
    counts = [-(-len(s) // ratio) for s in seqs]
    return [t.cpu() for t in torch.split(pooled, counts)]


def load_rows(cache, entries, rows: Sequence[torch.Tensor], cache_kv: bool) -> None:
    """Copy stored rows into their entries' pool blocks (the layout ``passages._write`` writes)."""
    if not entries:
        return
    pool = cache.pool
    bs = cache.block_size
    blk = torch.tensor([e.blocks[r // bs] for e in entries for r in range(e.num_tokens)], device=pool.device)
    slot = torch.tensor([r % bs for e in entries for r in range(e.num_tokens)], device=pool.device)
    data = torch.cat(list(rows)).to(device=pool.device, dtype=pool.dtype)
    if not cache_kv:
        pool[blk, slot] = data
        return
    for i in range(data.shape[1]):
        for j in range(2):
            pool[:, i, j][blk, slot] = data[:, i, j]
