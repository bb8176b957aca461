"""A real Ray cluster on loopback for the Ray tests: a head and one worker node, 2 CPUs in all.

The cluster gets its own temp dir and is stopped by its own handle. Its
processes inherit ``LOOPBACK_ENV`` (node address 127.0.0.1, usage stats and
their report off, the cloud probe sent to a closed loopback port); every
connection of the test process tree is sampled while the cluster lives.
"""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from engine.scaleout.local import LOOPBACK_ENV, loopback_env
from ray_helpers import ConnectionLog


HERE = Path(__file__).parent
_stops = []  # what the session fixtures below started, stopped when this folder's tests are done


def _stop_all():
    while _stops:
        _stops.pop()()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    # Session scope so the cluster serves every file here, but not the tests that run after this folder.
    if nextitem is None or HERE not in Path(nextitem.path).parents:
        _stop_all()


@pytest.fixture(scope="session")
def connection_log():
    log = ConnectionLog().start()
    _stops.append(log.stop)
    yield log
    _stop_all()


@pytest.fixture(scope="session")
def ray_cluster(connection_log):
    """A head (1 CPU) and a worker node (1 CPU) on 127.0.0.1; the driver connected."""
    tmp = tempfile.mkdtemp(prefix="rt")  # short: Ray's socket paths must fit 107 bytes
    os.makedirs(os.path.join(tmp, "ray"))
    saved = {k: os.environ.get(k) for k in list(LOOPBACK_ENV) + ["RAY_TMPDIR"]}
    os.environ["RAY_TMPDIR"] = tmp  # the cluster's address file too, not /tmp/ray
    with loopback_env():
        import ray
        from ray.cluster_utils import Cluster

        node = dict(node_ip_address="127.0.0.1", temp_dir=tmp, num_cpus=1, object_store_memory=200 << 20)
        cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
        cluster.add_node(**node)
    ray.init(address=cluster.address, logging_level="WARNING")

    def stop():
        ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            if k in ("http_proxy", "no_proxy"):
                continue  # loopback_env restored them
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)

    _stops.append(stop)
    yield cluster
    _stop_all()
