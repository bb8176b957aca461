"""Ray, imported lazily, and a local Ray instance that stays on loopback.

Only ``serve --replicas`` and ``batch`` import Ray (the ``ray`` extra). Without
``--ray-address`` they start a local instance, which by itself would:
- take the machine's LAN address as its node address;
- start an API server that probes the cloud metadata address (169.254.169.254,
  and metadata.google.internal through DNS) while building its usage report,
  even with usage stats off;
- report "usage stats disabled" to Ray's usage server.
``LOOPBACK_ENV`` stops all three with Ray's own switches, and sends the probe's
plain-http requests to a closed loopback port through ``http_proxy`` (https,
such as hub downloads, is untouched; loopback bypasses it). Ray's processes
inherit it; our actors drop the proxy again (``scrub_env``).
"""
import os
from typing import Optional

EXTRA_HINT = 'Ray is not installed: pip install "rerank-engine[ray]"'
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once
LOOPBACK_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_REPORT_URL": DEAD_PROXY + "/",
    # Ray's single-machine mode: every node address resolves to 127.0.0.1, never the LAN address.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "http_proxy": DEAD_PROXY,
    "no_proxy": "127.0.0.1,localhost,::1",
}


class RayMissing(ImportError):
    """The optional ``ray`` extra is not installed."""


def check_ray() -> None:
    """A one-line error naming the extra when Ray is missing, without importing it (``init`` must set
    ``LOOPBACK_ENV`` first)."""
    import importlib.util

    # Top-level names only: finding ``ray.serve`` would import ``ray``. These stand for ray[serve,data].
    for name in ("ray", "pyarrow", "fastapi", "uvicorn"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent missing, or a module set to None
            found = False
        if not found:
            raise RayMissing(f"{EXTRA_HINT} (no module {name})")


def require_ray():
    """``import ray``, or a one-line error naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401
        import ray.serve  # noqa: F401
    except ImportError as e:
        raise RayMissing(f"{EXTRA_HINT} ({e})") from None
    return ray


class loopback_env:
    """``with loopback_env():`` the processes started inside inherit ``LOOPBACK_ENV``. Ray reads some of
    it at import, so enter before importing Ray; on exit the proxy leaves this process again."""

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in ("http_proxy", "no_proxy")}
        os.environ.update(LOOPBACK_ENV)
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def scrub_env() -> None:
    """In a Ray worker of a local instance: drop the dead proxy, so the model code sees a plain environment."""
    if os.environ.get("http_proxy") == DEAD_PROXY:
        del os.environ["http_proxy"]


def init(address: Optional[str] = None, num_cpus: Optional[int] = None, num_gpus: Optional[int] = None):
    """Connect to the Ray cluster at ``address``, or start a local one on 127.0.0.1 (dashboard off).

    Returns the ``ray`` module. A driver already connected is left as it is.
    """
    if address is not None:
        if address.split("://")[-1].startswith(("127.", "localhost")):
            # Ray would swap a loopback address for the LAN one; keep it (read when Ray is imported).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray = require_ray()
        if not ray.is_initialized():
            ray.init(address=address, logging_level="WARNING")
        return ray
    with loopback_env():
        ray = require_ray()
        if not ray.is_initialized():
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     logging_level="WARNING")
    return ray
