"""Score calibration: Platt and isotonic fits, applied scores, model identity, the calibrate command."""
import json

import numpy as np
import pytest

from engine import Reranker
from engine.core.calibration import Calibration, CalibrationMismatch, fit, metrics, model_identity

pytest.importorskip("sklearn")

QUERY = "capital of china"
DOCS = ["The capital of China is Beijing.", "Gravity attracts bodies.", "Paris is in France.", ""]


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def test_platt_recovers_a_known_logistic():
    rs = np.random.RandomState(0)
    x = rs.normal(0.0, 3.0, 20000)
    y = (rs.uniform(size=x.size) < _sigmoid(1.5 * x - 0.7)).astype(int)
    cal = fit(x, y, "platt")
    exact = metrics(_sigmoid(1.5 * x - 0.7), y)["log_loss"]
    got = metrics(cal(x), y)["log_loss"]
    assert got <= exact * 1.01
    assert cal.params["a"] == pytest.approx(1.5, rel=0.05) and cal.params["b"] == pytest.approx(-0.7, abs=0.08)
    np.testing.assert_allclose(cal(x), _sigmoid(cal.params["a"] * x + cal.params["b"]), atol=1e-6)


def test_isotonic_is_monotone_and_within_unit_interval():
    rs = np.random.RandomState(1)
    x = rs.normal(0.0, 2.0, 3000)
    y = (rs.uniform(size=x.size) < _sigmoid(x)).astype(int)
    cal = fit(x, y, "isotonic")
    grid = np.linspace(-20, 20, 2001)
    p = cal(grid)
    assert np.all(np.diff(p) >= 0) and p.min() >= 0.0 and p.max() <= 1.0
    assert metrics(cal(x), y)["ece"] < metrics(_sigmoid(3 * x), y)["ece"]


def test_fit_refuses_one_class():
    with pytest.raises(ValueError, match="both labels"):
        fit([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="method"):
        fit([0.1, 0.2], [0, 1], "beta")


def test_calibrated_reranker_scores_and_wrong_model_refused(make_qwen3, tmp_path):
    folder = make_qwen3()
    path = tmp_path / "m.calibration.json"
    Calibration("platt", {"a": 0.5, "b": 0.3}, model_identity(folder)).save(path)
    plain = Reranker(str(folder), device="cpu", dtype="float32")
    cal = Reranker(str(folder), device="cpu", dtype="float32", calibration=str(path))
    logits = plain.predict([(QUERY, d) for d in DOCS], raw_scores=True)
    want = _sigmoid(0.5 * np.asarray(logits) + 0.3)
    np.testing.assert_allclose(cal.predict([(QUERY, d) for d in DOCS]), want, atol=1e-6)
    np.testing.assert_allclose(cal.predict([(QUERY, d) for d in DOCS], raw_scores=True), logits, atol=0)
    ranked = cal.rank(QUERY, DOCS)
    assert [r["index"] for r in ranked] == list(np.argsort(-want, kind="stable"))
    cut = float(np.median(want))
    kept = cal.rank(QUERY, DOCS, min_score=cut)
    assert sorted(r["index"] for r in kept) == sorted(i for i in range(len(DOCS)) if want[i] >= cut)
    # chunked scores are calibrated too: each chunk, then aggregated
    chunked = cal.rank(QUERY, DOCS, chunking={"tokens": 16, "overlap": 0})
    assert all(0.0 <= r["score"] <= 1.0 for r in chunked)
    other = make_qwen3(name="Qwen3-Reranker-untied", tie=False)
    with pytest.raises(CalibrationMismatch, match="fitted for another model"):
        Reranker(str(other), device="cpu", calibration=str(path))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a calibration file"):
        Reranker(str(folder), device="cpu", calibration=str(tmp_path / "bad.json"))


def test_calibrate_command_writes_a_file_the_reranker_loads(make_qwen3, tmp_path, capsys):
    from engine.cli import main

    folder = make_qwen3()
    rows = [{"query": QUERY, "document": d, "label": int(i % 2 == 0)}
            for i, d in enumerate(DOCS * 5 + [f"text {k} about rivers and china" for k in range(10)])]
    pairs = tmp_path / "labelled.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "m.calibration.json"
    for method in ("platt", "isotonic"):
        assert main(["calibrate", str(folder), "--device", "cpu", "--pairs", str(pairs), "--output", str(out),
                     "--method", method]) == 0
        err = capsys.readouterr().err
        assert "before: log_loss=" in err and "after: log_loss=" in err and "brier=" in err and "ece=" in err
        data = json.loads(out.read_text())
        assert data["method"] == method and data["model"] == model_identity(folder)
        rr = Reranker(str(folder), device="cpu", calibration=str(out))
        assert all(0.0 <= r["score"] <= 1.0 for r in rr.rank(QUERY, DOCS))
    (tmp_path / "broken.jsonl").write_text('{"query": "q", "document": "d", "label": 2}\n')
    assert main(["calibrate", str(folder), "--device", "cpu", "--pairs", str(tmp_path / "broken.jsonl"),
                 "--output", str(out)]) == 2
    assert "broken.jsonl:1" in capsys.readouterr().err
