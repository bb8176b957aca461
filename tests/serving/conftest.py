"""Live servers for the HTTP tests: uvicorn on a free 127.0.0.1 port, in a background thread.

Models are the tiny random Qwen3 folders of ``make_qwen3``; each is loaded once
per session and shared by every server built over it (servers are cheap).
"""
import pytest

pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn, prometheus-client) is not installed")
pytest.importorskip("uvicorn", reason="the server extra is not installed")

from engine.serving.server import ServerConfig, served_names  # noqa: E402
from engine.serving.service import Service  # noqa: E402
from server_helpers import EMBED_NAME, RERANK_NAME, LiveServer  # noqa: E402


@pytest.fixture(scope="session")
def rerank_folder(make_qwen3):
    return make_qwen3()


@pytest.fixture(scope="session")
def embed_folder(make_qwen3):
    return make_qwen3(name="Qwen3-Embedding-tiny", embed_tokenizer=True)


@pytest.fixture(scope="session")
def rerank_service(rerank_folder):
    return Service(str(rerank_folder), device="cpu")


@pytest.fixture(scope="session")
def embed_service(embed_folder):
    return Service(str(embed_folder), device="cpu")


@pytest.fixture(scope="session")
def start_server():
    """start_server(service, name=..., **ServerConfig fields) -> a started LiveServer, stopped at session end."""
    started = []

    def start(service: Service, name: str, **kwargs) -> LiveServer:
        config = ServerConfig(served_names=served_names(str(service.engine.folder), name), **kwargs)
        server = LiveServer(service, config).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def rerank_server(start_server, rerank_service):
    return start_server(rerank_service, RERANK_NAME)


@pytest.fixture(scope="session")
def embed_server(start_server, embed_service):
    return start_server(embed_service, EMBED_NAME)
