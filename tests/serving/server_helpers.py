"""Helpers of the server tests (a module with a unique name: tests import it, never conftest)."""
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from engine.serving.http import uvicorn_options
from engine.serving.server import ServerConfig, create_app
from engine.serving.service import Service

from textgen import WORDS, random_text  # noqa: F401 (the server tests import them from here)


RERANK_NAME = "tiny-reranker"
EMBED_NAME = "tiny-embedder"


class LiveServer:
    """uvicorn serving ``create_app(service, config)`` on a free 127.0.0.1 port, in a daemon thread."""

    def __init__(self, service: Service, config: ServerConfig, graceful_timeout_s: float = 5):
        self.service, self.config = service, config
        self.app = create_app(service, config)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_level="warning",
                                                     **uvicorn_options(config, graceful_timeout_s)))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        return self

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def client(self, **kwargs) -> httpx.Client:
        kwargs.setdefault("timeout", 60)
        return httpx.Client(base_url=self.url, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc, url: str, log_path, timeout: float = 120.0) -> None:
    """Poll ``url``/health until a subprocess server answers 200 (failing with its log if it died)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, Path(log_path).read_text()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.2)
