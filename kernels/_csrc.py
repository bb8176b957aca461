"""The C++ CPU kernels (csrc/engine_cpu.cpp): built on first use, then loaded from a cache.

Why a JIT build (``torch.utils.cpp_extension.load``) and not a build in setup.py: a setup.py
build needs torch at build time, so ``pip install -e .`` would either make pip download a
second, full torch into its isolated build environment or need ``--no-build-isolation`` (and
setuptools and wheel in the venv) in every command. The JIT build compiles against the torch
already installed, for the CPU it runs on (``-march=native``, AVX-512 or AVX2 vectors), once:
the module is cached under ``$ENGINE_CSRC_CACHE`` (default ``~/.cache/rerank-engine/csrc``),
keyed by the source, the torch version and the CPU's instruction set, and later imports load it in
well under a second.

``ENGINE_CSRC=0`` never builds or loads it; ``ENGINE_KERNELS=torch`` keeps it loaded but makes
every op run its torch reference (A/B checks). If the build fails (no compiler, no ninja), the
engine logs one line and runs the torch references.
"""
import hashlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("engine")

# The checkout's csrc/ (editable installs), else the copy a wheel install puts under share/.
SOURCE = next((p for p in (Path(__file__).resolve().parents[1] / "csrc" / "engine_cpu.cpp",
                           Path(sys.prefix) / "share" / "rerank-engine" / "csrc" / "engine_cpu.cpp") if p.is_file()),
              Path(__file__).resolve().parents[1] / "csrc" / "engine_cpu.cpp")
_lock = threading.Lock()
_state = {"tried": False, "module": None, "error": None}


def _flags():
    cap = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    flags = ["-O3", "-fopenmp", "-std=c++17"]
    if cap in ("AVX512", "AVX2"):
        flags += ["-march=native", f"-DCPU_CAPABILITY_{cap}", f"-DCPU_CAPABILITY={cap}"]
    return cap, flags


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build():
    import shutil

    from torch.utils.cpp_extension import load

    # pip's ninja lives beside this interpreter; a venv used without activation lacks it on PATH
    bindir = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and shutil.which("ninja", path=bindir):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    cap, flags = _flags()
    # -march=native: the binary is for this CPU's instruction set, so its flags are part of the key
    # (a home directory shared between machines must not load another CPU's build).
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + cap.encode()
                         + _cpu_flags().encode()).hexdigest()[:12]
    cache = Path(os.environ.get("ENGINE_CSRC_CACHE", Path.home() / ".cache" / "rerank-engine" / "csrc")) / key
    cache.mkdir(parents=True, exist_ok=True)
    built = any(cache.glob("*.so"))
    if not built:
        log.info("building the C++ CPU kernels (csrc/, once, about a minute) into %s", cache)
    return load(name="engine_cpu", sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                build_directory=str(cache), verbose=False)


def enabled() -> bool:
    return os.environ.get("ENGINE_CSRC", "1").strip().lower() not in ("0", "false", "no", "off")


def module() -> Optional[object]:
    """The loaded extension, or None (disabled, or the build failed: logged once)."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        if not enabled():
            log.info("C++ CPU kernels disabled (ENGINE_CSRC=0): CPU ops run their torch references")
        elif not SOURCE.is_file():
            log.warning("C++ CPU kernels not found (%s): CPU ops run their torch references", SOURCE)
        else:
            try:
                _state["module"] = _build()
            except Exception as e:  # no compiler, no ninja, a broken toolchain: fall back, once
                _state["error"] = e
                log.warning("C++ CPU kernels unavailable (%s: %s): CPU ops run their torch references",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        _state["tried"] = True
        return _state["module"]


def available() -> bool:
    """Whether CPU ops run the C++ kernels (built or loaded now if need be)."""
    return module() is not None


def reset() -> None:
    """Forget the load attempt (tests switch ENGINE_CSRC)."""
    with _lock:
        _state.update(tried=False, module=None, error=None)
