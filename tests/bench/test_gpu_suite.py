"""bench/gpu_suite.py --smoke: every section of the GPU suite on CPU at tiny sizes (kernels in the
Triton interpreter, end-to-end rows on tiny models), so the suite cannot rot between GPU runs; and its
report survives a SIGTERM with the sections it finished."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "bench" / "gpu_suite.py"
# The suite's order is part of its contract: the most wanted rows first, what could fault the device last.
SECTIONS = ["assets", "correctness-bf16", "timings", "e2e-rerank-0.6B", "e2e-minilm", "e2e-xlmr-large",
            "e2e-embed-0.6B", "e2e-rerank-4B", "sweeps", "fp16", "paged", "deltanet", "e2e-compile-rerank-0.6B",
            "e2e-compile-xlmr-large", "tma"]


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    env.pop("OUT", None)
    env.pop("BENCH_ASSETS", None)
    env.pop("TRITON_INTERPRET", None)  # --smoke sets it itself (tests/conftest.py sets it for this process)
    return env


def _report(out):
    return json.loads((out / "gpu_suite.json").read_text())


def test_smoke_runs_every_section_in_order(tmp_path):
    # Budget and caps are generous: this checks that every section runs, not how fast (a loaded CI machine).
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path), "--budget-s", "1500",
                           "--cap-scale", "4"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    doc = _report(tmp_path)
    assert doc["status"] == "complete" and doc["meta"]["smoke"] is True
    assert [s["name"] for s in doc["sections"]] == SECTIONS
    by_name = {s["name"]: s for s in doc["sections"]}
    for s in doc["sections"]:
        assert s["status"] == "ok", (s["name"], s["status"], s.get("error"))
        assert s["seconds"] > 0 and s["results"], s["name"]
    # kernel sections: correctness rows that passed and timings that ran
    for name in ("correctness-bf16", "fp16", "paged", "deltanet", "tma"):
        rows = by_name[name]["results"]["correctness"]
        assert rows and all(r["ok"] and r["rel_err"] <= r["tol"] for r in rows), name
    for name in ("timings", "sweeps", "paged", "deltanet", "tma"):
        rows = by_name[name]["results"]["timings"]
        assert rows and all("ms" in r for r in rows), (name, [r for r in rows if "ms" not in r])
    assert any("tma" in r["name"] for r in by_name["tma"]["results"]["correctness"])
    assert not any("tma" in r["name"] for r in by_name["correctness-bf16"]["results"]["correctness"])
    # e2e sections: each script's own JSON came back with our rows
    for name in SECTIONS:
        if name.startswith("e2e-"):
            (row,) = by_name[name]["results"]["e2e"]
            ours = row["results"].get("ours") or row["results"].get("ours_tokens_per_s")  # e2e_embed: one figure
            assert row["status"] == "ok" and ours, name
    assert "compile" in next(iter(by_name["e2e-compile-xlmr-large"]["results"]["e2e"][0]["results"]["ours"]))
    assert by_name["assets"]["results"]["assets"][0]["vocab"] == 151669
    assert doc["summary"]["correct_ok"] == doc["summary"]["correct_total"] > 0
    log = (tmp_path / "gpu_suite.log").read_text()
    assert all(f"-- {name}: ok" in log for name in SECTIONS)


def test_sigterm_halfway_leaves_a_valid_report(tmp_path):
    proc = subprocess.Popen([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path), "--budget-s", "600",
                             "--cap-scale", "4", "--sections", "correctness-bf16,e2e-minilm,fp16"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:  # wait until the second section is under way
            try:
                doc = _report(tmp_path)
            except (FileNotFoundError, ValueError):
                doc = None
            if doc and doc["sections"][1]["status"] == "running":
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the suite ended before it could be interrupted"
        time.sleep(1.0)  # inside the e2e script's child process
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-3000:]
    doc = _report(tmp_path)
    assert doc["status"] == "interrupted (SIGTERM)"
    done, cut, pending = doc["sections"]
    assert done["name"] == "correctness-bf16" and done["status"] == "ok"
    assert done["results"]["correctness"] and all(r["ok"] for r in done["results"]["correctness"])
    assert cut["name"] == "e2e-minilm" and cut["status"] == "interrupted"
    assert pending == {"name": "fp16", "status": "pending", "seconds": 0.0, "results": {}}
    assert "SIGTERM: report written" in out
    assert not list(tmp_path.glob("*.tmp"))
