"""The CLI's user errors: one line on stderr, exit 2, no traceback; and model files that fail to load name
the file and what is wrong."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine import Reranker
from engine.cli import main
from engine.weights import ModelFileError

REPO = Path(__file__).resolve().parents[2]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    lines = [x for x in err.splitlines() if "error" in x]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_malformed_and_non_jsonl_files(tmp_path, capsys, rerank_folder):
    bad = tmp_path / "docs.jsonl"
    bad.write_text('"one"\n{"text": "two"\n')
    code, _, err = run(capsys, "rank", "--model", str(rerank_folder), "--query", "q", "--documents", str(bad))
    one_line_error(code, err, f"{bad}:2: not valid JSON")
    array = tmp_path / "docs.json"
    array.write_text('[\n  "one",\n  "two"\n]\n')
    code, _, err = run(capsys, "rank", "--query", "q", "--documents", str(array))
    one_line_error(code, err, f"{array}:1", "expected JSONL")


def test_device_limits_and_output_are_checked_first(tmp_path, capsys, rerank_folder, embed_folder):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('"a"\n')
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        cuda = False
    if not cuda:
        code, _, err = run(capsys, "rank", "--model", str(rerank_folder), "--device", "cuda", "--query", "q",
                           "--documents", str(docs))
        one_line_error(code, err, "CUDA is not available")
    with pytest.raises(SystemExit) as e:
        main(["serve", str(rerank_folder), "--max-queue", "0"])
    assert e.value.code == 2 and "positive integer" in capsys.readouterr().err
    code, _, err = run(capsys, "embed", "--model", str(embed_folder), "--input", str(docs), "--output",
                       str(tmp_path / "no" / "x.npy"))
    one_line_error(code, err, "--output", "does not exist")


@pytest.mark.parametrize("argv,needle", [
    (["rank", "--query", "q", "--top-n", "0"], "--top-n must be a positive integer, got 0"),
    (["rank", "--query", "  ", ], "--query must not be empty"),
    (["embed", "--output", "x.csv"], "--output must end with .npy or .jsonl"),
])
def test_option_errors_are_one_line_and_exit_2_before_the_model_loads(tmp_path, capsys, monkeypatch, argv, needle):
    from engine.serving import service

    docs = tmp_path / "docs.jsonl"
    docs.write_text('"a"\n')
    monkeypatch.setattr(service, "Service", lambda *a, **k: pytest.fail("the model loaded before the check"))
    flag = "--documents" if argv[0] == "rank" else "--input"
    code, _, err = run(capsys, *argv, flag, str(docs))
    one_line_error(code, err, f"rerank-engine {argv[0]}: error: {needle}")


def test_an_empty_query_is_refused_in_python_too():
    with pytest.raises(ValueError, match="query must not be empty"):
        Reranker().rank("   ", ["a document"])


def test_a_closed_pipe_ends_the_output_quietly(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('"the river"\n"a city"\n')
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "rank", "--quiet", "--query", "river", "--documents",
                             str(docs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    proc.stdout.close()  # the reader is gone before anything is written (as ``| head -c 0``)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141, err
    assert b"Broken pipe" not in err and b"Traceback" not in err and b"error" not in err, err


def test_empty_documents_version_quiet_and_embedding_model_as_reranker(tmp_path, capsys, caplog, embed_folder):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, out, err = run(capsys, "rank", "--model", str(embed_folder), "--query", "q", "--documents", str(empty))
    assert code == 0 and json.loads(out) == {"query": "q", "results": []} and "no documents" in caplog.text
    docs = tmp_path / "docs.jsonl"
    docs.write_text('"the river"\n"a city"\n')
    # The bundled all-MiniLM-L6-v2 (BertModel) only embeds: as a reranker it ranks by cosine, and says so.
    code, out, err = run(capsys, "rank", "--task", "rerank", "--query", "river", "--documents", str(docs))
    assert code == 0 and len(json.loads(out)["results"]) == 2 and "cosine similarity" in caplog.text
    quiet = subprocess.run([sys.executable, "-m", "engine.cli", "rank", "--model", str(embed_folder), "--quiet",
                            "--query", "river", "--documents", str(docs)], capture_output=True, text=True,
                           cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert quiet.returncode == 0 and " INFO " not in quiet.stderr and json.loads(quiet.stdout)["results"]
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "rerank-engine 0.1.0" in capsys.readouterr().out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("broken,needle", [
    ("truncated-weights", "truncated or not a safetensors file"),
    ("garbage-config", "config.json: not valid JSON (line 1"),
    ("garbage-index", "model.safetensors.index.json: not valid JSON (line 1"),
    ("config-list", "config.json: expected an object"),
    ("garbage-tokenizer", "tokenizer files"),
    ("heads", "hidden_size (64) is not a multiple of num_attention_heads (5)"),
])
def test_model_files_that_fail_to_load_are_named(tmp_path, capsys, rerank_folder, broken, needle):
    folder = _copy(rerank_folder, tmp_path / "Qwen3-Reranker-broken")
    if broken == "truncated-weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif broken == "garbage-index":
        (folder / "model.safetensors.index.json").write_text('{"weight_map": ')
    elif broken == "garbage-config":
        (folder / "config.json").write_text("{not json")
    elif broken == "config-list":
        (folder / "config.json").write_text("[1, 2]")
    elif broken == "garbage-tokenizer":
        (folder / "tokenizer.json").write_text("\x00garbage")
    else:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(num_attention_heads=5)
        cfg.pop("head_dim")
        (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((ModelFileError, ValueError), match=needle.replace("(", r"\(").replace(")", r"\)")):
        Reranker(str(folder), device="cpu")
    docs = tmp_path / "docs.jsonl"
    docs.write_text('"a"\n')
    code, _, err = run(capsys, "rank", "--model", str(folder), "--query", "q", "--documents", str(docs))
    one_line_error(code, err, needle)
