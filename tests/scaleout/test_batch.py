"""Ray Data jobs: 20,000 pairs over 2 actors, one of which dies mid-job; bad rows; embeddings; the CLI."""
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from ray_helpers import skip_without_ray

skip_without_ray()
pytestmark = pytest.mark.ray

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from engine.scaleout.data import CRASH_ENV, run_batch  # noqa: E402
from textgen import random_text  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    from engine import Embedder, Reranker

    r = Reranker(device="cpu")
    return r, Embedder.from_engine(r.engine)


def make_pairs(queries=80, docs=250, seed=0):
    """Evaluation-style: every query against every document of a shared corpus (80 x 250 = 20,000 distinct
    pairs), shuffled. The bundled bi-encoder embeds each distinct text of a batch once, which keeps the
    job short on 2 cores."""
    rng = random.Random(seed)
    qs = [random_text(rng, rng.randint(3, 8)) for _ in range(queries)]
    ds = [random_text(rng, rng.randint(4, 24)) for _ in range(docs)]
    pairs = [(q, d) for q in qs for d in ds]
    rng.shuffle(pairs)
    return pairs


def test_20000_pairs_two_actors_one_killed(ray_cluster, reference, tmp_path, monkeypatch):
    pairs = make_pairs()
    assert len(set(pairs)) == 20_000
    src = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"query": [q for q, _ in pairs], "document": [d for _, d in pairs]}), src)
    marker = tmp_path / "killed"
    monkeypatch.setenv(CRASH_ENV, f"2:{marker}")  # the first actor to finish its 2nd batch dies before returning it
    out = tmp_path / "scores.parquet"
    report = run_batch("rank", str(src), str(out), ray_address=ray_cluster.address, concurrency=2, batch_size=2000,
                       num_cpus=1, progress=False, device="cpu")
    assert marker.exists()  # an actor really died mid-job
    killed = int(marker.read_text())
    import psutil

    assert not psutil.pid_exists(killed)
    got = pq.read_table(out)
    assert got.column_names == ["id", "score"]
    ids = got["id"].to_pylist()
    assert ids == list(range(20_000))  # every row exactly once, in input order
    assert report.rows == report.written == 20_000 and report.errors == 0
    np.testing.assert_allclose(got["score"].to_numpy(), reference[0].predict(pairs), atol=ATOL, rtol=0)


def test_bad_rows_go_to_the_errors_file_cli(ray_cluster, reference, tmp_path):
    rows = [{"query": "capital of china", "document": "Beijing is the capital."},
            {"query": "capital of china", "document": ""},
            {"query": "capital of china", "document": None},
            {"query": 7, "document": "Gravity."},
            {"query": "capital of china"},
            {"query": "capital of china", "document": ["a", "list"]},
            {"query": "capital of china", "document": "Paris is the capital of France."},
            {"query": "   ", "document": "Whitespace query."}]
    src = tmp_path / "pairs.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{not json")  # row 3
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "scores.parquet"
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "batch", "rank", "--input", str(src), "--output",
                           str(out), "--ray-address", ray_cluster.address, "--concurrency", "1", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = [json.loads(line) for line in (tmp_path / "scores.errors.jsonl").read_text().splitlines()]
    assert errors == [{"id": 1, "reason": "document is empty"},
                      {"id": 2, "reason": "document is null"},
                      {"id": 3, "reason": "line 4 is not valid JSON (Expecting property name enclosed in double "
                                          "quotes)"},
                      {"id": 4, "reason": "query is int, not a string"},
                      {"id": 5, "reason": "document is null"},
                      {"id": 6, "reason": "document is list, not a string"},
                      {"id": 8, "reason": "query is empty"}]
    got = pq.read_table(out)
    assert got["id"].to_pylist() == [0, 7]
    want = reference[0].predict([("capital of china", "Beijing is the capital."),
                                 ("capital of china", "Paris is the capital of France.")])
    np.testing.assert_allclose(got["score"].to_numpy(), want, atol=ATOL, rtol=0)
    assert "rows/s" in proc.stderr and "7 bad rows" in proc.stderr


def test_embed_with_ids(ray_cluster, reference, tmp_path):
    rng = random.Random(3)
    texts = [random_text(rng, rng.randint(1, 30)) for _ in range(300)]
    ids = [f"doc-{i}" for i in range(300)]
    src = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), src)
    out = tmp_path / "emb.parquet"
    report = run_batch("embed", str(src), str(out), ray_address=ray_cluster.address, concurrency=2, batch_size=64,
                       progress=False, device="cpu")
    got = pq.read_table(out)
    assert got["id"].to_pylist() == ids and report.written == 300
    emb = np.stack(got["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(emb, reference[1].embed(texts), atol=ATOL, rtol=0)


def test_input_errors_are_one_line(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text('{"q": "a", "document": "b"}\n')
    with pytest.raises(ValueError, match="no 'query' column"):
        run_batch("rank", str(src), str(tmp_path / "o.parquet"))
    (tmp_path / "x.csv").write_text("query,document\na,b\n")
    with pytest.raises(ValueError, match="must be .parquet or .jsonl"):
        run_batch("rank", str(tmp_path / "x.csv"), str(tmp_path / "o.parquet"))
    with pytest.raises(ValueError, match="output must be a .parquet"):
        run_batch("embed", str(src), str(tmp_path / "o.csv"))
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')
    with pytest.raises(ValueError, match="appears twice"):
        run_batch("embed", str(dup), str(tmp_path / "o.parquet"))


def test_results_keep_each_row_once():
    from engine.scaleout.data import Results

    res = Results(6)
    part = lambda rows: pa.table({"_row": pa.array(rows, pa.int64()), "score": pa.array([float(r) for r in rows])})
    assert res.add(part([0, 1, 2])) == 3
    assert res.add(part([2, 3, 3])) == 1  # 2 seen before, 3 twice in one batch
    assert res.add(part([0, 1, 2])) == 0  # a whole batch run again
    assert res.add(part([5])) == 1
    got = pa.concat_tables(res.tables)
    assert sorted(got["_row"].to_pylist()) == [0, 1, 2, 3, 5] and res.rows == 5
