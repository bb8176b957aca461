"""Ray stays on loopback: no connection of the test process tree left 127.0.0.1 while the cluster ran.

Runs after the serving and batch tests (file order), so the sampled log covers
their whole traffic. The cloud metadata probe of Ray's API server is checked
directly too, since a probe can be shorter than the sampling interval.
"""
import ipaddress
import socket

import pytest

from ray_helpers import ray_processes, skip_without_ray

skip_without_ray()
pytestmark = pytest.mark.ray

from engine.scaleout.local import DEAD_PROXY, LOOPBACK_ENV  # noqa: E402


def is_loopback(ip) -> bool:
    if ip is None:
        return True
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or addr).is_loopback


def test_no_connection_beyond_loopback(ray_cluster, connection_log):
    assert not is_loopback("0.0.0.0") and not is_loopback("::ffff:192.0.2.2") and is_loopback("::1")
    connection_log.sample()
    assert connection_log.samples >= 2
    assert any(name.startswith(("gcs_server", "raylet")) for name, *_ in connection_log.seen)  # it saw Ray
    # (process, local address, remote address, state) -> times seen
    remote = {k: n for k, n in connection_log.seen.items() if not is_loopback(k[2])}
    assert not remote, remote  # nothing ever connected beyond loopback
    # Every socket is bound to loopback, but one: Ray Serve 2.60 binds each replica's inter-deployment
    # gRPC server to [::] (hard-coded in ray/serve/_private/replica.py); it takes no traffic here.
    local = {k: n for k, n in connection_log.seen.items() if not is_loopback(k[1])}
    assert all(k[0].startswith("ray::ServeRepli") and k[3] == "LISTEN" for k in local), local


def test_node_addresses_are_loopback(ray_cluster):
    import ray

    nodes = ray.nodes()
    assert len(nodes) == 2 and all(n["Alive"] for n in nodes)
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}


def test_cloud_probe_goes_nowhere(ray_cluster, monkeypatch):
    """Ray's API server inherited LOOPBACK_ENV, under which Ray's cloud probe only reaches a closed
    loopback port."""
    api = [p for p in ray_processes("") if any(a.endswith("dashboard/dashboard.py") for a in p.cmdline())]
    assert len(api) == 1  # started even with the dashboard off, to build the usage report
    env = api[0].environ()
    for k, v in LOOPBACK_ENV.items():
        assert env.get(k) == v, k

    from ray._common.usage import usage_lib

    for k, v in LOOPBACK_ENV.items():
        monkeypatch.setenv(k, v)
    tried = []
    real_connect = socket.socket.connect

    def connect(self, address):
        tried.append(address[:2])
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    assert usage_lib.get_cloud_from_metadata_requests() == "unknown"
    assert tried and set(tried) == {("127.0.0.1", int(DEAD_PROXY.rsplit(":", 1)[1]))}, tried
