"""Helpers of the Ray tests (a module with a unique name: tests import it, never conftest)."""
import importlib.util
import socket
import threading

import pytest

# find_spec, not import: Ray reads part of LOOPBACK_ENV when it is imported, which happens in ray_cluster.
HAVE_RAY = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("psutil") is not None
NO_RAY = 'the Ray tests need the ray extra and psutil: pip install "rerank-engine[ray]" psutil'


class ConnectionLog:
    """Every inet connection of this process and its descendants, sampled in a thread."""

    def __init__(self, every_s: float = 0.5):
        import psutil

        self.psutil, self.every_s = psutil, every_s
        self.seen: dict = {}  # (pid name, laddr ip, raddr ip, status) -> count
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connection-log", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=10)

    def sample(self):
        me = self.psutil.Process()
        for p in [me] + me.children(recursive=True):
            try:
                conns = p.net_connections(kind="inet")
                name = p.name()
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, FileNotFoundError):
                continue
            for c in conns:
                key = (name, c.laddr.ip if c.laddr else None, c.raddr.ip if c.raddr else None, c.status)
                self.seen[key] = self.seen.get(key, 0) + 1
        self.samples += 1

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes(prefix: str):
    """Descendant processes whose Ray title starts with ``prefix`` (e.g. ``ray::ServeReplica``)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cmd and cmd[0].startswith(prefix):
            out.append(p)
    return out


def skip_without_ray():
    if not HAVE_RAY:
        pytest.skip(NO_RAY, allow_module_level=True)
